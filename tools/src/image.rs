//! Building the boot image and running it under QEMU: `cargo xtask run` and the test-image stage.
//!
//! The kernel ends every run through QEMU's isa-debug-exit device: status
//! 33 means success, 35 failure. Status 0 (a triple fault under
//! `-no-reboot`), any other status, and a run past its time limit are
//! failures too.

use crate::prereq;
use crate::test::Tally;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Options of `cargo xtask run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Number of CPUs QEMU gives the machine (1 to 64).
    #[arg(long, default_value_t = 8)]
    pub smp: u32,
    /// Build the image in debug mode (about 45x slower under TCG).
    #[arg(long)]
    pub debug: bool,
    /// Seconds before a run that has not ended is killed and failed.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// The MMU server implementation the guest workloads run on: a name from
    /// `mmu_server::registry` (`reference`, `fast-shared`, ...), `all` for
    /// one boot per registered implementation, or `none` to only boot.
    #[arg(long, default_value = "reference")]
    pub mmu: String,
    /// How the kernel reaches the MMU server: `task` (the server runs in
    /// ring 3 in its own address space), `direct` (linked into the kernel,
    /// called in ring 0: the cost of isolation, measured), or `all` (both,
    /// one boot each).
    #[arg(long, default_value = "task")]
    pub transport: String,
    /// Count instructions: boot under `-icount shift=0,align=off,sleep=off`
    /// (the TSC then advances one tick per instruction) and print the cost
    /// table (instructions per request round trip and per forwarded #PF
    /// exit, median and p99) for each transport and server.
    #[arg(long)]
    pub icount: bool,
    /// The vCPU scheduler policy, passed as the kernel word `sched=NAME`:
    /// `pinned`, `global-rr`, `credit`, a comma list, or `all` (one boot per
    /// policy, MMU server and transport). Without it the kernel runs its
    /// in-kernel pinned loop. Prints a per-policy table (migrations,
    /// flushes they caused, pCPU busy time, vCPU CPU time, Jain's index,
    /// shares) and writes `timeline-<run>.svg` per run with a trace.
    #[arg(long)]
    pub sched: Option<String>,
    /// The grant server, passed as the kernel word `grant=NAME`:
    /// `always-flush`, `accessed-hint`, a comma list, or `all` (one boot
    /// per grant server, MMU server and transport). A grant run runs the
    /// split-driver workloads (block-like and net-like frontend/backend
    /// pairs) and only them, and ends with a table per pair: maps, unmaps,
    /// batches, flushes done and avoided, shootdown IPIs, pCPUs flushed.
    #[arg(long)]
    pub grant: Option<String>,
    /// An unmodified Multiboot v1 kernel (ELF32, ELF64 or a.out kludge) to
    /// run as a one-vCPU domain of 128 MiB, on each MMU server of `--mmu`
    /// in turn (one boot): entered in 32-bit protected mode with paging
    /// off, EBX the Multiboot info; its serial output is shown. The command
    /// exits with QEMU's status for the value the guest wrote to port 0xf4,
    /// `(value << 1) | 1`, as a runner script expects. A file that is not a
    /// Multiboot kernel, or too large for the domain, is refused naming the
    /// file and the reason.
    #[arg(long, value_name = "FILE")]
    pub guest: Option<PathBuf>,
    /// A module for the `--guest` kernel (repeatable, in order; each gets its
    /// file name as its string), e.g. an environ file `NR_CPUS=1`.
    #[arg(long = "module", value_name = "FILE", requires = "guest")]
    pub modules: Vec<PathBuf>,
    /// The `--guest` kernel's command line.
    #[arg(long, value_name = "STR", requires = "guest", default_value = "")]
    pub guest_cmdline: String,
    /// Arguments passed to the kernel command line (QEMU `-append`).
    #[arg(last = true)]
    pub kernel_args: Vec<String>,
}

/// isa-debug-exit status of a run that reported success (`0x10 << 1 | 1`).
pub const EXIT_SUCCESS: i32 = 33;
/// isa-debug-exit status of a run that reported failure (`0x11 << 1 | 1`).
pub const EXIT_FAILURE: i32 = 35;

/// How a boot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The image reported success.
    Success,
    /// The image reported failure (test failed, exception, panic).
    Failure,
    /// QEMU exited 0: a triple fault, or the image never reached isa-debug-exit.
    TripleFault,
    /// QEMU exited with another status (or was killed by a signal).
    Other(Option<i32>),
    /// The run did not end within the time limit and was killed.
    Timeout(Duration),
}

/// What one boot printed and how it ended.
pub struct Outcome {
    /// Serial console lines, without line terminators.
    pub lines: Vec<String>,
    /// How the run ended.
    pub ending: Ending,
    /// Wall time from QEMU spawn to the line saying all CPUs are online.
    pub online_after: Option<Duration>,
}

impl Outcome {
    /// The first serial line containing `needle`.
    pub fn line_with(&self, needle: &str) -> Option<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .find(|l| l.contains(needle))
    }
}

/// The server task binaries the image embeds: (package, binary, the
/// environment variable `image/build.rs` reads its path from).
pub const TASKS: [(&str, &str, &str); 3] = [
    ("mmu-server", "mmu-task", "UMBRA_MMU_TASK"),
    ("sched", "sched-task", "UMBRA_SCHED_TASK"),
    ("grant-server", "grant-task", "UMBRA_GRANT_TASK"),
];

/// Builds one server task binary (always release: it runs in ring 3 and its
/// speed is part of what is measured) and returns its path. Tasks have
/// their own target directory: their flags differ from the kernel's
/// (position-independent code linked high, the runtime cfg `umbra_task`),
/// and sharing one would rebuild both every time.
pub fn build_task(package: &str, bin: &str) -> Result<PathBuf> {
    let target_dir = target_dir().join("task");
    let mut cmd = prereq::cargo();
    cmd.args([
        "build",
        "-p",
        package,
        "--bin",
        bin,
        "--release",
        "--target",
        prereq::KERNEL_TARGET,
        "--target-dir",
    ])
    .arg(&target_dir)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            "-Crelocation-model=pic",
            "--cfg",
            "umbra_task",
            "-Cstrip=debuginfo",
        ]
        .join("\x1f"),
    );
    prereq::run_checked(&mut cmd)?;
    let path = target_dir
        .join(prereq::KERNEL_TARGET)
        .join("release")
        .join(bin);
    if !path.is_file() {
        bail!(
            "the {bin} build succeeded but {} is missing",
            path.display()
        );
    }
    Ok(path)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| prereq::workspace_root().join("target"))
}

/// Builds the server tasks, then the boot image (crate `image`: the kernel,
/// the guests and the tasks embedded; release unless `debug`), and returns
/// its path.
pub fn build_kernel(debug: bool) -> Result<PathBuf> {
    let mut cmd = prereq::cargo();
    cmd.args(["build", "-p", "image", "--target", prereq::KERNEL_TARGET]);
    for (package, bin, var) in TASKS {
        cmd.env(var, build_task(package, bin)?);
    }
    if !debug {
        cmd.arg("--release");
    }
    prereq::run_checked(&mut cmd)?;
    let image = target_dir()
        .join(prereq::KERNEL_TARGET)
        .join(if debug { "debug" } else { "release" })
        .join("umbra");
    if !image.is_file() {
        bail!(
            "the kernel build succeeded but {} is missing",
            image.display()
        );
    }
    Ok(image)
}

/// Boots `image` under QEMU (TCG, q35) with `smp` CPUs and kernel command
/// line `append`, streaming the serial console to stdout when `echo`.
pub fn boot(
    image: &std::path::Path,
    smp: u32,
    append: &str,
    timeout: Duration,
    echo: bool,
) -> Result<Outcome> {
    boot_with(image, smp, append, timeout, echo, &[])
}

/// QEMU's instruction counting: the virtual clock, and with it the TSC,
/// advances 1 ns per guest instruction.
pub const ICOUNT: &str = "shift=0,align=off,sleep=off";

/// [`boot`] with more QEMU options (`-icount ...`).
pub fn boot_with(
    image: &std::path::Path,
    smp: u32,
    append: &str,
    timeout: Duration,
    echo: bool,
    qemu_args: &[String],
) -> Result<Outcome> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(qemu_args);
    // -nodefaults: no VGA, no NIC (whose option ROM slows the firmware).
    cmd.args(["-machine", "q35", "-nodefaults", "-m", "512M", "-smp"])
        .arg(smp.to_string())
        .args([
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
        ])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if !append.is_empty() {
        cmd.args(["-append", append]);
    }
    if echo {
        eprintln!("xtask: {cmd:?}");
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send((text, Instant::now())).is_err() {
                break;
            }
        }
    });

    let mut lines = Vec::new();
    let mut online_after = None;
    let deadline = start + timeout;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((line, at)) => {
                if echo {
                    println!("{line}");
                }
                if online_after.is_none() && line.contains("CPUs online") {
                    online_after = Some(at - start);
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().context("waiting for QEMU")?;
    let _ = reader.join();
    let ending = if timed_out {
        Ending::Timeout(timeout)
    } else {
        match status.code() {
            Some(EXIT_SUCCESS) => Ending::Success,
            Some(EXIT_FAILURE) => Ending::Failure,
            Some(0) => Ending::TripleFault,
            code => Ending::Other(code),
        }
    };
    Ok(Outcome {
        lines,
        ending,
        online_after,
    })
}

pub fn describe(ending: &Ending) -> String {
    match ending {
        Ending::Success => "the image reported success".into(),
        Ending::Failure => format!("the image reported failure (exit status {EXIT_FAILURE})"),
        Ending::TripleFault => {
            "QEMU exited with status 0: triple fault or no isa-debug-exit write".into()
        }
        Ending::Other(Some(c)) => format!("QEMU exited with unexpected status {c}"),
        Ending::Other(None) => "QEMU was killed by a signal".into(),
        Ending::Timeout(t) => format!("no result within {} s; QEMU killed", t.as_secs()),
    }
}

/// `cargo xtask run`.
pub fn run(args: &RunArgs) -> Result<()> {
    if let Some(kernel) = &args.guest {
        prereq::ensure_qemu()?;
        prereq::ensure_kernel_target()?;
        let mmu = match args.mmu.as_str() {
            "all" => mmu_server::registry::NAMES.join(","),
            other => other.to_string(),
        };
        let code = crate::guest::run(
            &crate::guest::GuestArgs {
                kernel,
                modules: &args.modules,
                cmdline: &args.guest_cmdline,
            },
            &crate::guest::Boot {
                mmu: &mmu,
                transport: &args.transport,
                smp: args.smp,
                debug: args.debug,
                timeout: Duration::from_secs(args.timeout),
            },
        )?;
        std::process::exit(code);
    }
    if !(1..=64).contains(&args.smp) {
        bail!(
            "--smp {} is out of range: Umbra runs 1 to 64 CPUs",
            args.smp
        );
    }
    let scheds = crate::compare::choices("sched", &args.sched, crate::compare::SCHEDS)?;
    let grants = crate::compare::choices("grant", &args.grant, crate::compare::GRANTS)?;
    prereq::ensure_qemu()?;
    prereq::ensure_kernel_target()?;
    let names: Vec<&str> = match args.mmu.as_str() {
        "none" => vec![""],
        "all" => mmu_server::registry::NAMES.to_vec(),
        one if mmu_server::registry::NAMES.contains(&one) => vec![one],
        other => bail!(
            "--mmu {other}: no such MMU implementation; registered: {} (or `all`, `none`)",
            mmu_server::registry::NAMES.join(", ")
        ),
    };
    let transports: Vec<&str> = match args.transport.as_str() {
        "all" => vec!["task", "direct"],
        one @ ("task" | "direct") => vec![one],
        other => bail!("--transport {other}: no such transport; known: task, direct (or `all`)"),
    };
    let created = crate::results::write::utc_stamp(std::time::SystemTime::now()).0;
    let image = build_kernel(args.debug)?;
    let mut failed = Vec::new();
    let mut costs = Vec::new();
    let mut runs = Vec::new();
    let mut boots = Vec::new();
    for sched in &scheds {
        for grant in &grants {
            for transport in &transports {
                for name in &names {
                    boots.push((sched, grant, *transport, *name));
                }
            }
        }
    }
    let mut grant_lines = Vec::new();
    for (sched, grant, transport, name) in boots {
        let mut append = args.kernel_args.join(" ");
        if !name.is_empty() {
            append = format!("mmu={name} transport={transport} {append}")
                .trim_end()
                .to_string();
        }
        if let Some(policy) = sched {
            append = format!("sched={policy} {append}").trim_end().to_string();
        }
        if let Some(g) = grant {
            append = format!("grant={g} {append}").trim_end().to_string();
        }
        if args.icount {
            append = format!("{append} icount").trim_start().to_string();
        }
        eprintln!(
            "xtask: booting {} with -smp {}{}",
            image.display(),
            args.smp,
            if append.is_empty() {
                String::new()
            } else {
                format!(", command line \"{append}\"")
            }
        );
        let started = Instant::now();
        let out = boot_with(
            &image,
            args.smp,
            &append,
            Duration::from_secs(args.timeout),
            true,
            &icount_args(args.icount),
        )?;
        costs.extend(
            out.lines
                .iter()
                .filter_map(|l| l.strip_prefix("umbra-costs: "))
                .map(str::to_string),
        );
        grant_lines.extend(
            out.lines
                .iter()
                .filter_map(|l| l.strip_prefix("grant: "))
                .map(str::to_string),
        );
        let mut words = args.kernel_args.clone();
        words.push(format!("transport={transport}"));
        if let Some(policy) = sched {
            words.push(format!("sched={policy}"));
        }
        if let Some(g) = grant {
            words.push(format!("grant={g}"));
        }
        if args.icount {
            words.push("icount".into());
        }
        let selectors = crate::compare::run_selectors(name, args.smp, &words);
        let label = crate::results::labels(std::slice::from_ref(&selectors)).remove(0);
        let (run, error) =
            crate::compare::to_run(label, selectors, append.clone(), &out, started.elapsed());
        if let Some(e) = error {
            eprintln!("xtask: the report did not parse, recorded empty: {e}");
        }
        runs.push(run);
        if let Some(t) = out.online_after {
            eprintln!(
                "xtask: all CPUs online {:.3} s after QEMU start (wall)",
                t.as_secs_f64()
            );
        }
        if out.ending != Ending::Success {
            eprintln!("xtask: run {append:?}: {}", describe(&out.ending));
            failed.push(describe(&out.ending));
        }
    }
    if !costs.is_empty() {
        let unit = if args.icount {
            "instructions"
        } else {
            "TSC ticks (use --icount for instructions)"
        };
        println!("xtask: ---- costs in {unit} ----");
        println!(
            "{:<14} {:<10} {:<12} {:>8} {:>10} {:>10}",
            "server", "transport", "figure", "samples", "median", "p99"
        );
        for c in &costs {
            if let Some(row) = CostRow::parse(c) {
                println!(
                    "{:<14} {:<10} {:<12} {:>8} {:>10} {:>10}",
                    row.server, row.transport, row.figure, row.samples, row.median, row.p99
                );
            }
        }
    }
    print_grant_summary(&grant_lines);
    // Label the runs against each other: `reference sched=credit`.
    let selectors: Vec<_> = runs.iter().map(|r| r.selectors.clone()).collect();
    for (run, label) in runs.iter_mut().zip(crate::results::labels(&selectors)) {
        run.label = label;
    }
    let mut results = crate::results::Results::new("run");
    results.runs = runs;
    crate::compare::print_sched_summary(&results);
    crate::compare::save("run", created, results.runs)?;
    match failed.first() {
        None => Ok(()),
        Some(why) => bail!("{} run(s) failed; first: {why}", failed.len()),
    }
}

/// The columns of the grant summary: (heading, key of the `grant:` line).
const GRANT_COLUMNS: [(&str, &str); 11] = [
    ("mmu", "mmu"),
    ("grant", "grant"),
    ("pair", "pair"),
    ("maps", "maps"),
    ("unmaps", "unmaps"),
    ("batches", "batches"),
    ("flushes", "flushes"),
    ("avoided", "flushes_avoided"),
    ("avoided%", "avoided_pct"),
    ("ipis", "shootdown_ipis"),
    ("pcpus-flushed", "pcpus_flushed"),
];

/// Prints one table of every boot's `grant:` lines (one row per MMU
/// server, grant server and split-driver pair); nothing without any.
pub fn print_grant_summary(lines: &[String]) {
    let rows = grant_rows(lines);
    if rows.is_empty() {
        return;
    }
    println!("xtask: ---- grant servers, per split-driver pair ----");
    let head: Vec<String> = GRANT_COLUMNS
        .iter()
        .map(|(h, _)| format!("{h:>14}"))
        .collect();
    println!("{}", head.concat());
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| format!("{c:>14}")).collect();
        println!("{}", cells.concat());
    }
}

/// The summary's cells from `grant: v=1 key=value ...` lines (a missing
/// key shows `-`; a line of another version is skipped).
pub fn grant_rows(lines: &[String]) -> Vec<Vec<String>> {
    lines
        .iter()
        .filter(|l| l.starts_with("v=1 "))
        .map(|l| {
            let pairs: Vec<(&str, &str)> = l
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect();
            GRANT_COLUMNS
                .iter()
                .map(|(_, key)| {
                    pairs
                        .iter()
                        .find(|(k, _)| k == key)
                        .map_or("-".to_string(), |(_, v)| v.to_string())
                })
                .collect()
        })
        .collect()
}

/// The QEMU options of `--icount` (none without it).
pub fn icount_args(icount: bool) -> Vec<String> {
    if icount {
        vec!["-icount".into(), ICOUNT.into()]
    } else {
        Vec::new()
    }
}

/// One `umbra-costs:` line of the kernel's report.
#[derive(Debug, PartialEq, Eq)]
pub struct CostRow {
    /// The MMU server.
    pub server: String,
    /// `task` or `direct`.
    pub transport: String,
    /// `RoundTrip` or `PfExit`.
    pub figure: String,
    /// Samples taken.
    pub samples: u64,
    /// Median TSC ticks (instructions under -icount).
    pub median: u64,
    /// 99th percentile.
    pub p99: u64,
}

impl CostRow {
    /// Parses `server S transport T figure F samples N median M p99 P ...`.
    pub fn parse(line: &str) -> Option<CostRow> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let get = |key: &str| {
            w.iter()
                .position(|x| *x == key)
                .and_then(|i| w.get(i + 1))
                .map(|s| s.to_string())
        };
        Some(CostRow {
            server: get("server")?,
            transport: get("transport")?,
            figure: get("figure")?,
            samples: get("samples")?.parse().ok()?,
            median: get("median").unwrap_or_else(|| "0".into()).parse().ok()?,
            p99: get("p99").unwrap_or_else(|| "0".into()).parse().ok()?,
        })
    }
}

/// Time limit of the self-test boot (the shootdown stress takes a while
/// under TCG on a busy 2-core machine).
const TEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Time limit of each plain boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Counts `test <name> ... ok` / `... FAILED` lines.
fn tally_test_lines(lines: &[String]) -> Tally {
    let mut t = Tally::default();
    for l in lines.iter().filter(|l| l.starts_with("test ")) {
        if l.ends_with(" ... ok") {
            t.passed += 1;
        } else if l.contains(" ... FAILED") {
            t.failed += 1;
        }
    }
    t
}

/// Parses the image's `umbra: selftest: N passed, M failed` summary.
fn parse_summary(lines: &[String]) -> Option<Tally> {
    let line = lines
        .iter()
        .find_map(|l| l.strip_prefix("umbra: selftest: "))?;
    let (p, f) = line.split_once(" passed, ")?;
    Some(Tally {
        passed: p.trim().parse().ok()?,
        failed: f.strip_suffix(" failed")?.trim().parse().ok()?,
    })
}

/// Checks the expected-failure boot: the fault report must name #PF,
/// vector 14, RIP, CR2 = the faulting address, and the faulting CPU, and the
/// run must be reported as failed.
fn check_fault_report(out: &Outcome, cpu: u32) -> Result<(), String> {
    let report = out
        .line_with("umbra: EXCEPTION")
        .ok_or("no `umbra: EXCEPTION` report on the console")?;
    let wanted = [
        "#PF".to_string(),
        "vector 14".to_string(),
        "rip 0x".to_string(),
        "cr2 0xdeadbee000".to_string(),
        format!("cpu {cpu} "),
        "error 0x".to_string(),
    ];
    for w in &wanted {
        if !report.contains(w.as_str()) {
            return Err(format!("fault report `{report}` lacks `{w}`"));
        }
    }
    if out.ending != Ending::Failure {
        return Err(format!(
            "the faulting run was not reported as failed: {}",
            describe(&out.ending)
        ));
    }
    Ok(())
}

/// Checks the `test-panic` boot: a panic report naming the CPU and the
/// message, and a run reported as failed.
fn check_panic_report(out: &Outcome, cpu: u32) -> Result<(), String> {
    let want = format!("umbra: PANIC on cpu {cpu}: ");
    let report = out
        .line_with(&want)
        .ok_or(format!("no `{want}` report on the console"))?;
    if !report.contains("deliberate panic (test-panic)") {
        return Err(format!("panic report `{report}` lacks the panic message"));
    }
    if out.ending != Ending::Failure {
        return Err(format!(
            "the panicking run was not reported as failed: {}",
            describe(&out.ending)
        ));
    }
    Ok(())
}

/// Checks a `test-stack-overflow` boot: `stack overflow on cpu N` naming
/// the guard page below that CPU's kernel stack, the exception report
/// after it (#DF, taken on the #DF IST stack, or #PF), and a failed run.
fn check_stack_overflow_report(out: &Outcome, cpu: u32) -> Result<(), String> {
    let want = format!("umbra: stack overflow on cpu {cpu}: ");
    let report = out
        .line_with(&want)
        .ok_or(format!("no `{want}` report on the console"))?;
    let stack = format!("guard page below cpu {cpu}'s kernel stack");
    if !report.contains(&stack) {
        return Err(format!("stack overflow report `{report}` lacks `{stack}`"));
    }
    let exception = out
        .line_with("umbra: EXCEPTION")
        .ok_or("no `umbra: EXCEPTION` report after the stack overflow line")?;
    if !(exception.contains("#DF vector 8") || exception.contains("#PF vector 14"))
        || !exception.contains(&format!("cpu {cpu} "))
    {
        return Err(format!(
            "exception report `{exception}` is not a #DF or #PF on cpu {cpu}"
        ));
    }
    if out.ending != Ending::Failure {
        return Err(format!(
            "the overflowing run was not reported as failed: {}",
            describe(&out.ending)
        ));
    }
    Ok(())
}

/// Checks a `test-null` boot: a null dereference report for the CPU, a #PF
/// report with CR2 0, and a failed run.
fn check_null_report(out: &Outcome, cpu: u32) -> Result<(), String> {
    let want = format!("umbra: null pointer dereference on cpu {cpu}: address 0x0 ");
    out.line_with(&want)
        .ok_or(format!("no `{want}` report on the console"))?;
    let exception = out
        .line_with("umbra: EXCEPTION")
        .ok_or("no `umbra: EXCEPTION` report after the null dereference line")?;
    for w in ["#PF vector 14", "cr2 0x0 ", &format!("cpu {cpu} ")] {
        if !exception.contains(w) {
            return Err(format!("exception report `{exception}` lacks `{w}`"));
        }
    }
    if out.ending != Ending::Failure {
        return Err(format!(
            "the null-dereferencing run was not reported as failed: {}",
            describe(&out.ending)
        ));
    }
    Ok(())
}

/// Boots the test image and tallies its test lines, then the
/// expected-failure boots (fault, panic, triple fault, hang, stack overflow
/// on an AP and on the bootstrap CPU, null dereference: each must be
/// reported as a failure) and plain boots at -smp 1, 4 and 16.
pub fn test_image() -> Result<Tally> {
    prereq::ensure_qemu()?;
    prereq::ensure_kernel_target()?;
    let image = build_kernel(false)?;
    let mut tally = Tally::default();

    eprintln!("xtask: test image: self-tests (-smp 8, command line `test`)");
    let out = boot(&image, 8, "test", TEST_TIMEOUT, true)?;
    let lines = tally_test_lines(&out.lines);
    let summary = parse_summary(&out.lines);
    tally += lines;
    record(
        &mut tally,
        "selftest_run",
        match (&out.ending, summary) {
            (_, None) => Err(format!("no summary line; {}", describe(&out.ending))),
            (_, Some(s)) if s != lines => Err(format!(
                "summary says {} passed, {} failed but {} ok / {} FAILED lines were printed",
                s.passed, s.failed, lines.passed, lines.failed
            )),
            (Ending::Success, Some(s)) if s.failed == 0 => Ok(()),
            (Ending::Failure, Some(s)) if s.failed > 0 => {
                Err(format!("{} self-test(s) failed", s.failed))
            }
            (e, Some(_)) => Err(format!("summary and exit status disagree: {}", describe(e))),
        },
    );

    svm_boots(&image, &mut tally)?;

    eprintln!(
        "xtask: test image: expected-failure boot (command line `test-fault`): \
         the fault report below is expected"
    );
    let out = boot(&image, 8, "test-fault", BOOT_TIMEOUT, true)?;
    record(
        &mut tally,
        "expected_failure_fault_report",
        check_fault_report(&out, 7),
    );

    eprintln!("xtask: test image: expected-failure boot (`test-panic`)");
    let out = boot(&image, 4, "test-panic", BOOT_TIMEOUT, true)?;
    record(
        &mut tally,
        "expected_failure_panic_report",
        check_panic_report(&out, 3),
    );

    eprintln!("xtask: test image: expected-failure boot (`test-triple-fault`)");
    let out = boot(&image, 2, "test-triple-fault", BOOT_TIMEOUT, true)?;
    record(
        &mut tally,
        "expected_failure_triple_fault",
        match out.ending {
            Ending::TripleFault => Ok(()),
            other => Err(format!(
                "expected QEMU exit status 0, got: {}",
                describe(&other)
            )),
        },
    );

    eprintln!("xtask: test image: expected-failure boot (`test-hang`, 3 s limit)");
    let out = boot(&image, 2, "test-hang", Duration::from_secs(3), true)?;
    record(
        &mut tally,
        "expected_failure_hang_timeout",
        match out.ending {
            Ending::Timeout(_) => Ok(()),
            other => Err(format!(
                "expected the time limit to end the run, got: {}",
                describe(&other)
            )),
        },
    );

    for (smp, cpu) in [(4, 3), (1, 0)] {
        eprintln!(
            "xtask: test image: expected-failure boot (`test-stack-overflow`, -smp {smp}): \
             the stack overflow report below is expected"
        );
        let out = boot(&image, smp, "test-stack-overflow", BOOT_TIMEOUT, true)?;
        record(
            &mut tally,
            &format!("expected_failure_stack_overflow_cpu{cpu}"),
            check_stack_overflow_report(&out, cpu),
        );
    }

    eprintln!(
        "xtask: test image: expected-failure boot (`test-null`): \
         the null dereference report below is expected"
    );
    let out = boot(&image, 2, "test-null", BOOT_TIMEOUT, true)?;
    record(
        &mut tally,
        "expected_failure_null_dereference",
        check_null_report(&out, 1),
    );

    for (append, wanted) in [
        ("mmu=reference tset", "unknown command-line word \"tset\""),
        (
            "mmu=reference mmu=fast-shared",
            "command-line key \"mmu\" given twice",
        ),
    ] {
        eprintln!("xtask: test image: expected-failure boot (`{append}`: refused)");
        let out = boot(&image, 1, append, BOOT_TIMEOUT, true)?;
        record(
            &mut tally,
            &format!(
                "expected_failure_cmdline_{}",
                append.replace([' ', '='], "_")
            ),
            check_refused(&out, wanted),
        );
    }

    for smp in [1, 4, 16] {
        eprintln!("xtask: test image: plain boot with -smp {smp}");
        let out = boot(&image, smp, "", BOOT_TIMEOUT, true)?;
        let want = format!("{smp}/{smp} CPUs online");
        let last = out.lines.last().map(String::as_str).unwrap_or("");
        record(
            &mut tally,
            &format!("boot_smp_{smp}"),
            if out.ending != Ending::Success {
                Err(describe(&out.ending))
            } else if !last.contains(&want) {
                Err(format!("last line `{last}` does not contain `{want}`"))
            } else {
                Ok(())
            },
        );
    }
    Ok(tally)
}

/// The guest workloads and the in-image conformance scenarios, one boot per
/// registered MMU implementation (command line `mmu=<name> svm-test`).
fn svm_boots(image: &std::path::Path, tally: &mut Tally) -> Result<()> {
    for name in mmu_server::registry::NAMES {
        eprintln!(
            "xtask: test image: guest workloads (transports task and direct) and conformance on MMU `{name}`"
        );
        let append = format!("mmu={name} transport=task,direct svm-test");
        let out = boot(image, 8, &append, TEST_TIMEOUT, true)?;
        let lines = tally_test_lines(&out.lines);
        *tally += lines;
        let summary = out.lines.iter().any(|l| l.starts_with("umbra: svm-test: "));
        record(
            tally,
            &format!("svm_run_{name}"),
            match &out.ending {
                _ if !summary => Err(format!("no svm-test summary; {}", describe(&out.ending))),
                Ending::Success if lines.failed == 0 => Ok(()),
                Ending::Failure if lines.failed > 0 => {
                    Err(format!("{} workload/scenario test(s) failed", lines.failed))
                }
                e => Err(format!(
                    "test lines and exit status disagree: {}",
                    describe(e)
                )),
            },
        );
    }
    containment_boot(image, tally)?;
    scheduler_boot(image, tally)?;
    grant_boot(image, tally)?;
    unmodified_guest_boot(image, tally)
}

/// Builds `mbtest`, Umbra's own unmodified Multiboot test kernel (release,
/// its own linker script), and returns its path.
pub fn build_mbtest() -> Result<PathBuf> {
    let mut cmd = prereq::cargo();
    cmd.args([
        "build",
        "-p",
        "mbtest",
        "--release",
        "--target",
        prereq::KERNEL_TARGET,
    ]);
    prereq::run_checked(&mut cmd)?;
    let path = target_dir()
        .join(prereq::KERNEL_TARGET)
        .join("release")
        .join("mbtest");
    if !path.is_file() {
        bail!(
            "the mbtest build succeeded but {} is missing",
            path.display()
        );
    }
    Ok(path)
}

/// One boot runs `mbtest` (an ordinary Multiboot kernel: no hypercall)
/// with an environ module under every registered MMU server in turn; each
/// of its `mbtest: <check> ... ok|FAILED` lines is a test, and QEMU must
/// end with status 1: the guest wrote 0 (no check failed) under every
/// server.
fn unmodified_guest_boot(image: &std::path::Path, tally: &mut Tally) -> Result<()> {
    let kernel = build_mbtest()?;
    let environ = target_dir().join("umbra").join("environ");
    std::fs::create_dir_all(environ.parent().expect("a parent"))?;
    std::fs::write(&environ, "NR_CPUS=1\nMEMSIZE=128\n")?;
    let args = crate::guest::GuestArgs {
        kernel: &kernel,
        modules: std::slice::from_ref(&environ),
        cmdline: "expect-environ",
    };
    let initrd = crate::guest::initrd(&args)?;
    let append = format!(
        "mbguest mmu={} transport=task",
        mmu_server::registry::NAMES.join(",")
    );
    eprintln!(
        "xtask: test image: the unmodified Multiboot test kernel mbtest under every MMU server"
    );
    let out = boot_with(
        image,
        8,
        &append,
        TEST_TIMEOUT,
        true,
        &["-initrd".to_string(), initrd],
    )?;
    let (mut passed, mut failed) = (0, 0);
    for l in out.lines.iter().filter(|l| l.contains("] mbtest: ")) {
        if l.ends_with(" ... ok") {
            passed += 1;
        } else if l.contains(" ... FAILED") {
            failed += 1;
            eprintln!("xtask: test-image: {l}");
        }
    }
    tally.passed += passed;
    tally.failed += failed;
    let runs = mmu_server::registry::NAMES.len();
    // The guest's own summary, once per server: its last line has no
    // newline, so this also checks the console shows a partial last line.
    let summaries = out
        .lines
        .iter()
        .filter(|l| l.contains("] mbtest: ") && l.ends_with(" passed, 0 failed"))
        .count();
    record(
        tally,
        "mbtest_every_server_exits_0",
        match &out.ending {
            Ending::Other(Some(1)) if passed > 0 && failed == 0 && summaries == runs => Ok(()),
            e => Err(format!(
                "{passed} checks passed, {failed} failed, {summaries} summaries over {runs} \
                 servers; {}",
                describe(e)
            )),
        },
    );
    Ok(())
}

/// The broken grant servers the last grant boot runs, and what each one's
/// stop report must say.
const GRANT_MISBEHAVING: [(&str, &str); 2] = [
    (
        "misbehave-panic",
        "panicked: misbehave-panic: deliberate panic",
    ),
    (
        "misbehave-plan",
        "was refused: the granted side is not in the granter's memory",
    ),
];

/// The grant boots: the split-driver workloads under every grant server
/// and every MMU server over the task transport, then once over the direct
/// transport, then two broken grant servers and a good one in one boot.
/// Each run prints test lines for its workloads, each pair's flush goal
/// (`always-flush` spares none; `accessed-hint` meets the pair's share)
/// and that every grant and mapping was given back; each broken server
/// must be stopped and reported, its domains stopped, every frame given
/// back, nothing copied, and the boot must go on.
fn grant_boot(image: &std::path::Path, tally: &mut Tally) -> Result<()> {
    let all = |names: &[&str]| names.join(",");
    let boots = [
        format!(
            "mmu={} transport=task grant={} svm-test",
            all(mmu_server::registry::NAMES),
            all(grant_server::registry::NAMES)
        ),
        "mmu=reference transport=direct grant=accessed-hint svm-test".to_string(),
        // Two broken grant servers (test-only names the grant task answers
        // to), then a good one in the same boot.
        "mmu=reference transport=task grant=misbehave-panic,misbehave-plan,accessed-hint svm-test"
            .to_string(),
    ];
    for (i, append) in boots.iter().enumerate() {
        eprintln!("xtask: test image: split-driver workloads under the grant servers ({append})");
        let out = boot(image, 8, append, TEST_TIMEOUT, true)?;
        let lines = tally_test_lines(&out.lines);
        *tally += lines;
        let tables = out
            .lines
            .iter()
            .filter(|l| l.starts_with("grant: v=1 "))
            .count();
        record(
            tally,
            &format!("grant_boot_{i}"),
            match &out.ending {
                _ if tables == 0 => Err(format!("no grant table; {}", describe(&out.ending))),
                _ if append.contains("misbehave-") => GRANT_MISBEHAVING
                    .iter()
                    .find(|(name, cause)| {
                        !out.lines.iter().any(|l| {
                            l.contains(&format!("grant server `{name}` STOPPED on pcpu "))
                                && l.contains(cause)
                        })
                    })
                    .map_or(Ok(()), |(name, cause)| {
                        Err(format!("no STOPPED report for `{name}` saying `{cause}`"))
                    }),
                Ending::Success if lines.failed == 0 => Ok(()),
                e => Err(format!(
                    "{} test line(s) failed; {}",
                    lines.failed,
                    describe(e)
                )),
            },
        );
    }
    Ok(())
}

/// One boot runs every scheduler policy over the task transport (with the
/// reference MMU server), then two test-only broken policies: one that
/// answers `Run` for a vCPU running elsewhere, one for a vCPU that does not
/// exist. Every workload must pass under each; the kernel must report the
/// broken decisions as refused and run nothing twice; `pinned` must not
/// migrate.
fn scheduler_boot(image: &std::path::Path, tally: &mut Tally) -> Result<()> {
    let append =
        "mmu=reference sched=pinned,global-rr,credit,misbehave-twice,misbehave-unknown svm-test";
    eprintln!(
        "xtask: test image: scheduler policies, then broken ones (the refusals below are expected)"
    );
    let out = boot(image, 8, append, TEST_TIMEOUT, true)?;
    *tally += tally_test_lines(&out.lines);
    let summary = |policy: &str| {
        out.lines
            .iter()
            .find(|l| l.starts_with(&format!("sched: v=1 policy={policy} summary ")))
            .cloned()
    };
    record(
        tally,
        "sched_pinned_never_migrates",
        match summary("pinned") {
            Some(l) if l.contains(" migrations=0 ") => Ok(()),
            Some(l) => Err(format!("pinned migrated: {l}")),
            None => Err("no summary line for pinned".into()),
        },
    );
    for policy in ["misbehave-twice", "misbehave-unknown"] {
        let refused = out
            .lines
            .iter()
            .any(|l| l.contains("refused the decision") && l.contains(&format!("of `{policy}`")));
        record(
            tally,
            &format!("sched_{policy}_refused"),
            match summary(policy) {
                _ if !refused => Err(format!("no refused decision of `{policy}` reported")),
                Some(l) if !l.contains(" refused=0 ") => Ok(()),
                Some(l) => Err(format!("the summary counts no refusal: {l}")),
                None => Err(format!("no summary line for {policy}")),
            },
        );
    }
    record(
        tally,
        "sched_boot_ends_alive",
        match &out.ending {
            Ending::Success => Ok(()),
            e => Err(format!("the scheduler boot failed: {}", describe(e))),
        },
    );
    Ok(())
}

/// The misbehaving MMU servers (test-only names the MMU task answers to)
/// and what each one's stop report must say.
const MISBEHAVING: [(&str, &str); 4] = [
    (
        "misbehave-panic",
        "panicked: misbehave-panic: deliberate panic",
    ),
    ("misbehave-wild", "exception #PF (vector 14"),
    ("misbehave-hang", "no reply within"),
    (
        "misbehave-stack",
        "stack overflow: #PF (vector 14) in the guard page",
    ),
];

/// One boot runs the four misbehaving servers, then `reference`: each
/// broken server must be stopped and reported (server, request, cause),
/// its domains reported stopped, and afterwards the reference server's
/// workloads must pass in the same boot, which must end alive.
fn containment_boot(image: &std::path::Path, tally: &mut Tally) -> Result<()> {
    let names: Vec<&str> = MISBEHAVING.iter().map(|(n, _)| *n).collect();
    // `relay` last: a test-only server that forwards every request to the
    // reference server's task through the kernel (servers calling servers).
    let append = format!(
        "mmu={},reference,relay transport=task svm-test",
        names.join(",")
    );
    eprintln!(
        "xtask: test image: containment of misbehaving servers (the STOPPED reports below are expected)"
    );
    let out = boot(image, 8, &append, TEST_TIMEOUT, true)?;
    *tally += tally_test_lines(&out.lines);
    for (name, cause) in MISBEHAVING {
        record(
            tally,
            &format!("contain_{name}_report"),
            check_containment(&out.lines, name, cause),
        );
    }
    record(tally, "contain_kernel_goes_on", check_goes_on(&out));
    Ok(())
}

/// The stop report of server `name` names the server, the request it was
/// serving and `cause`; the run's domains are reported stopped with it.
fn check_containment(lines: &[String], name: &str, cause: &str) -> Result<(), String> {
    let start = lines
        .iter()
        .position(|l| l.starts_with(&format!("umbra: MMU implementation: {name} ")))
        .ok_or(format!("no run of `{name}`"))?;
    let run = &lines[start + 1..];
    let end = run
        .iter()
        .position(|l| l.starts_with("umbra: MMU implementation: "))
        .unwrap_or(run.len());
    let run = &run[..end];
    let report = run
        .iter()
        .find(|l| l.contains(&format!("MMU server `{name}` STOPPED on pcpu ")))
        .ok_or(format!("no STOPPED report for `{name}`"))?;
    if !report.contains("while serving ")
        || !report.contains(" { vcpu: ") && !report.contains(" { domain: ")
    {
        return Err(format!("report does not name the request: {report}"));
    }
    if !report.contains(cause) {
        return Err(format!(
            "report does not give the cause `{cause}`: {report}"
        ));
    }
    let stopped = run
        .iter()
        .filter(|l| l.starts_with("svm: workload ") && l.contains("[stopped: MMU server stopped"))
        .count();
    if stopped == 0 {
        return Err(format!(
            "no workload of `{name}` reported stopped by the server's stop"
        ));
    }
    if !run
        .iter()
        .any(|l| l.starts_with(&format!("test contain-{name}-task ... ok")))
    {
        return Err(format!("the image did not count `{name}` as contained"));
    }
    Ok(())
}

/// After the misbehaving servers, `reference` passes every workload in the
/// same boot, and the boot ends alive with the success status.
fn check_goes_on(out: &Outcome) -> Result<(), String> {
    let start = out
        .lines
        .iter()
        .position(|l| l.starts_with("umbra: MMU implementation: reference "))
        .ok_or("no `reference` run after the misbehaving servers")?;
    let after = &out.lines[start..];
    let passed = after
        .iter()
        .find(|l| l.starts_with("svm: ") && l.ends_with(" workloads passed"))
        .ok_or("no workload verdict for `reference`")?;
    let (p, n) = passed
        .trim_start_matches("svm: ")
        .trim_end_matches(" workloads passed")
        .split_once('/')
        .ok_or(format!("unreadable verdict: {passed}"))?;
    if p != n {
        return Err(format!("after the misbehaving servers: {passed}"));
    }
    if !after
        .iter()
        .any(|l| l.contains("CPUs online") && l.starts_with("umbra: ") && l.contains('/'))
    {
        return Err("the kernel did not reach its last line".into());
    }
    match &out.ending {
        Ending::Success => Ok(()),
        e => Err(format!(
            "the boot did not end alive and successful: {}",
            describe(e)
        )),
    }
}

/// A boot with a command line the kernel does not understand stops with a
/// message naming the offending word, before running anything.
fn check_refused(out: &Outcome, wanted: &str) -> Result<(), String> {
    if !out.lines.iter().any(|l| l.contains(wanted)) {
        return Err(format!("no line says `{wanted}`"));
    }
    if out
        .lines
        .iter()
        .any(|l| l.starts_with("umbra: MMU implementation"))
    {
        return Err("the refused command line still ran workloads".into());
    }
    match &out.ending {
        Ending::Failure => Ok(()),
        e => Err(format!("expected a failed boot, got: {}", describe(e))),
    }
}

/// Counts one host-side check of the test-image stage and prints its line.
fn record(tally: &mut Tally, name: &str, result: Result<(), String>) {
    match result {
        Ok(()) => {
            tally.passed += 1;
            eprintln!("xtask: test-image: {name} ... ok");
        }
        Err(why) => {
            tally.failed += 1;
            eprintln!("xtask: test-image: {name} ... FAILED: {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_rows_take_each_column_by_key_and_show_a_missing_one_as_a_dash() {
        let lines = vec![
            "v=1 mmu=reference transport=task grant=accessed-hint pair=blk maps=320 unmaps=320 \
             batches=64 flushes=1 flushes_avoided=63 avoided_pct=98.4 shootdown_ipis=1 \
             pcpus_flushed=2 copies=320"
                .to_string(),
            "v=1 mmu=fast-shared grant=always-flush pair=net".to_string(),
            "v=2 mmu=future".to_string(),
        ];
        let rows = grant_rows(&lines);
        assert_eq!(rows.len(), 2, "the v=2 line is skipped");
        assert_eq!(
            rows[0],
            [
                "reference",
                "accessed-hint",
                "blk",
                "320",
                "320",
                "64",
                "1",
                "63",
                "98.4",
                "1",
                "2"
            ]
        );
        assert_eq!(rows[1][..3], ["fast-shared", "always-flush", "net"]);
        assert!(rows[1][3..].iter().all(|c| c == "-"), "{:?}", rows[1]);
    }

    /// The names in the `[dependencies]` table of a crate's manifest.
    fn dependencies(krate: &str) -> Vec<String> {
        let path = prereq::workspace_root().join(krate).join("Cargo.toml");
        let text = std::fs::read_to_string(&path).expect("the manifest is readable");
        text.lines()
            .skip_while(|l| l.trim() != "[dependencies]")
            .skip(1)
            .take_while(|l| !l.starts_with('['))
            .filter_map(|l| l.split(['=', '.']).next())
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty() && !k.starts_with('#'))
            .collect()
    }

    #[test]
    fn the_kernel_and_the_guests_name_no_server_guest_or_test_crate() {
        let policy = [
            "mmu-server",
            "grant-server",
            "sched",
            "conformance",
            "guests",
            "image",
            "task-rt",
        ];
        let kernel = dependencies("kernel");
        assert!(kernel.contains(&"abi".to_string()), "{kernel:?}");
        for d in &kernel {
            assert!(!policy.contains(&d.as_str()), "the kernel depends on {d}");
        }
        assert_eq!(
            dependencies("guests"),
            ["abi"],
            "guests may depend on abi alone"
        );
        let image = dependencies("image");
        for d in ["kernel", "guests", "mmu-server"] {
            assert!(
                image.iter().any(|x| x == d),
                "the image must link {d}: {image:?}"
            );
        }
    }

    #[test]
    fn parses_cost_lines_and_rejects_garbage() {
        let row = CostRow::parse(
            "server fast-shared transport task figure RoundTrip samples 812 median 2150 p99 9001   (request round trip)",
        )
        .expect("a well-formed cost line parses");
        assert_eq!(
            row,
            CostRow {
                server: "fast-shared".into(),
                transport: "task".into(),
                figure: "RoundTrip".into(),
                samples: 812,
                median: 2150,
                p99: 9001
            }
        );
        assert!(CostRow::parse("server x transport task figure PfExit samples many").is_none());
        assert!(CostRow::parse("nothing here").is_none());
    }

    fn containment_run(report: &str, contained: &str) -> Vec<String> {
        lines(&format!(
            "umbra: MMU implementation: misbehave-panic (transport task)\n{report}\n\
             svm: workload demand-64M   d1 vcpus 1 exits 3 FAIL (stopped) [stopped: MMU server stopped 0x0]\n\
             {contained}\n\
             umbra: MMU implementation: reference (transport task)\n\
             svm: 11/11 workloads passed"
        ))
    }

    #[test]
    fn containment_check_wants_server_request_cause_and_stopped_domains() {
        let good = "svm: MMU server `misbehave-panic` STOPPED on pcpu 6 while serving PageFault { vcpu: VcpuId(10) }: panicked: misbehave-panic: deliberate panic on request 400";
        let ok_line = "test contain-misbehave-panic-task ... ok (1 domains stopped)";
        let cause = "panicked: misbehave-panic: deliberate panic";
        assert_eq!(
            check_containment(&containment_run(good, ok_line), "misbehave-panic", cause),
            Ok(())
        );
        // Another cause than the expected one.
        let wrong = good.replace("panicked: misbehave-panic", "exception #GP");
        assert!(
            check_containment(&containment_run(&wrong, ok_line), "misbehave-panic", cause).is_err()
        );
        // No request named.
        let vague = "svm: MMU server `misbehave-panic` STOPPED on pcpu 6: panicked: misbehave-panic: deliberate panic";
        assert!(
            check_containment(&containment_run(vague, ok_line), "misbehave-panic", cause).is_err()
        );
        // The image did not count it as contained.
        let failed = "test contain-misbehave-panic-task ... FAILED: server stopped false";
        assert!(
            check_containment(&containment_run(good, failed), "misbehave-panic", cause).is_err()
        );
        // A report of another server does not count.
        assert!(check_containment(
            &containment_run(good, ok_line),
            "misbehave-hang",
            "no reply"
        )
        .is_err());
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(String::from).collect()
    }

    #[test]
    fn tallies_test_lines_and_summary() {
        let l = lines(
            "umbra: booting\ntest a ... ok\ntest b ... FAILED: why\ntest c ... ok\n\
             umbra: selftest: 2 passed, 1 failed",
        );
        assert_eq!(
            tally_test_lines(&l),
            Tally {
                passed: 2,
                failed: 1
            }
        );
        assert_eq!(
            parse_summary(&l),
            Some(Tally {
                passed: 2,
                failed: 1
            })
        );
        assert_eq!(parse_summary(&lines("umbra: booting")), None);
    }

    #[test]
    fn fault_report_check_wants_every_field_and_a_failed_run() {
        let report =
            "umbra: EXCEPTION #PF vector 14 error 0x2 rip 0x10abcd cr2 0xdeadbee000 cpu 7 rsp 0x1";
        let out = |ending, text: &str| Outcome {
            lines: lines(text),
            ending,
            online_after: None,
        };
        assert!(check_fault_report(&out(Ending::Failure, report), 7).is_ok());
        assert!(check_fault_report(&out(Ending::Failure, report), 3).is_err());
        assert!(check_fault_report(&out(Ending::TripleFault, report), 7).is_err());
        assert!(check_fault_report(&out(Ending::Failure, "umbra: booting"), 7).is_err());
        let no_cr2 = report.replace("cr2 0xdeadbee000", "cr2 0x0");
        assert!(check_fault_report(&out(Ending::Failure, &no_cr2), 7).is_err());
    }

    #[test]
    fn stack_overflow_check_wants_the_cpu_the_stack_and_a_failed_run() {
        let text = "umbra: stack overflow on cpu 3: #DF hit the guard page below cpu 3's \
                    kernel stack (cr2 0x1207e08, rsp 0x1207e10)\n\
                    umbra: EXCEPTION #DF vector 8 error 0x0 rip 0x10466b cr2 0x1207e08 cpu 3 rsp 0x1";
        let out = |ending, text: &str| Outcome {
            lines: lines(text),
            ending,
            online_after: None,
        };
        assert!(check_stack_overflow_report(&out(Ending::Failure, text), 3).is_ok());
        assert!(check_stack_overflow_report(&out(Ending::Failure, text), 0).is_err());
        assert!(check_stack_overflow_report(&out(Ending::TripleFault, text), 3).is_err());
        let ist = text.replace("3's kernel stack", "3's #DF IST stack");
        assert!(check_stack_overflow_report(&out(Ending::Failure, &ist), 3).is_err());
        let no_exception = text.lines().next().unwrap();
        assert!(check_stack_overflow_report(&out(Ending::Failure, no_exception), 3).is_err());
        let plain_fault =
            "umbra: EXCEPTION #PF vector 14 error 0x2 rip 0x1 cr2 0x1207e08 cpu 3 rsp 0x1";
        assert!(check_stack_overflow_report(&out(Ending::Failure, plain_fault), 3).is_err());
    }

    #[test]
    fn null_check_wants_the_report_cr2_zero_and_a_failed_run() {
        let text = "umbra: null pointer dereference on cpu 1: address 0x0 (the null page is \
                    unmapped), rip 0x100377\n\
                    umbra: EXCEPTION #PF vector 14 error 0x0 rip 0x100377 cr2 0x0 cpu 1 rsp 0x1";
        let out = |ending, text: &str| Outcome {
            lines: lines(text),
            ending,
            online_after: None,
        };
        assert!(check_null_report(&out(Ending::Failure, text), 1).is_ok());
        assert!(check_null_report(&out(Ending::Failure, text), 2).is_err());
        assert!(check_null_report(&out(Ending::Other(Some(1)), text), 1).is_err());
        let elsewhere = text.replace("cr2 0x0 ", "cr2 0x10 ");
        assert!(check_null_report(&out(Ending::Failure, &elsewhere), 1).is_err());
        let no_line = text.lines().nth(1).unwrap();
        assert!(check_null_report(&out(Ending::Failure, no_line), 1).is_err());
    }
}
