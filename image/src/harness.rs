//! The in-image harness: which servers and transports a boot runs, each server's run, the test lines, and making the servers (task or direct).

use crate::conf;
use crate::report::{report, verdict};
use abi::task::{ControlPage, Op, TaskInit, TaskInitReply};
use abi::{Mfn, MmuServer, MAX_MESSAGE};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use kernel::kprintln;
use kernel::svm::domain::{DomainSpec, MultibootGuest, NO_EXIT_STATUS};
use kernel::svm::sched::{SchedTransport, Scheduler};
use kernel::svm::{host, GrantDoor, GrantTransport, Transport};
use kernel::task::Task;
use task_rt::mem::WindowMem;

/// The command-line words the harness understands: `mmu=NAME[,NAME...]`,
/// `transport=task|direct[,...]`, `svm-test` (print test lines and run the
/// conformance scenarios), `icount` (the TSC counts instructions),
/// `sched=POLICY` (run the vCPUs under that scheduler server, over the same
/// transport as the MMU server; without it each pCPU round-robins the vCPUs
/// pinned to it, in the kernel), `grant=NAME[,NAME...]` (run the
/// split-driver workloads, and only them, under each named grant server),
/// `mbguest` (run the unmodified Multiboot kernel of the boot modules, and
/// only it, then end QEMU with the status it wrote to its exit port).
pub const WORDS: &[&str] = &[
    "mmu=",
    "transport=",
    "sched=",
    "grant=",
    "mbguest",
    "svm-test",
    "icount",
];

/// The test-only MMU server that forwards every request to the reference
/// server's task through the kernel (servers calling servers).
const RELAY: &str = "relay";

/// The test-only grant server whose copy plans point outside the granter
/// (the kernel must refuse every one: nothing may be copied).
const WILD_PLANS: &str = "misbehave-plan";

/// Shadow-pool size in frames (32 MiB).
const SHADOW_POOL_FRAMES: u64 = 8192;

/// Every guest workload of a run as the kernel sees it: its spec. The
/// scheduler workloads (CPU-bound vCPUs, three times more than pCPUs) run
/// only under a scheduler server: without one they would only slow the
/// run. A grant run runs the split-driver workloads and only them.
fn specs(with_scheduler: bool, grant_run: bool) -> Vec<DomainSpec> {
    let chosen: Vec<usize> = guests::work::WORKLOADS
        .iter()
        .enumerate()
        .filter(|(_, w)| (with_scheduler || !w.needs_scheduler) && w.grant == grant_run)
        .map(|(i, _)| i)
        .collect();
    // A partner's place in this run's list (its domain is that plus one).
    let place = |peer: usize| chosen.iter().position(|&i| i == peer).map(|p| p as u32);
    chosen
        .iter()
        .map(|&i| (i, &guests::work::WORKLOADS[i]))
        .map(|(i, w)| DomainSpec {
            name: w.name,
            vcpus: w.vcpus,
            mem_mib: w.mem_mib,
            first_pcpu: w.first_pcpu,
            kernel_zaps: w.kernel_zaps,
            entry: guests::work::guest_main as *const () as u64,
            pf_entry: guests::rt::umbra_guest_pf_entry as *const () as u64,
            weights: w.weights,
            index: i as u64,
            peer: w.peer.and_then(place),
            multiboot: None,
        })
        .collect()
}

/// Runs what the command line asks for once every CPU is online: with
/// `mmu=<name>[,<name>...]`, the guest workloads on each named MMU server in
/// turn, over `transport=task|direct[,...]` (default `task`), and under
/// each scheduler policy of `sched=POLICY[,...]` if given. Returns false
/// when something failed. In the test image (`svm-test`) a name
/// `misbehave-*` is a deliberately broken server: its run passes when the
/// server is stopped and reported, its domains are stopped, and the boot
/// goes on to the next name.
pub fn boot_hook(cmdline: &'static str) -> bool {
    let Some(list) = kernel::boot::arg_value(cmdline, "mmu") else {
        return true;
    };
    let transports = kernel::boot::arg_value(cmdline, "transport").unwrap_or("task");
    if let Some(bad) = transports
        .split(',')
        .find(|t| !matches!(*t, "task" | "direct"))
    {
        kprintln!("svm: unknown transport {bad:?}; known: \"task\", \"direct\"");
        return false;
    }
    let test_mode = kernel::boot::has_arg(cmdline, "svm-test");
    let Some(policies) = choices(cmdline, "sched", "scheduler policy", sched::registry::NAMES)
    else {
        return false;
    };
    let Some(grants) = choices(
        cmdline,
        "grant",
        "grant server",
        grant_server::registry::NAMES,
    ) else {
        return false;
    };
    let guest = match kernel::boot::has_arg(cmdline, "mbguest") {
        false => None,
        true if kernel::boot::arg_value(cmdline, "grant").is_some()
            || kernel::boot::arg_value(cmdline, "sched").is_some() =>
        {
            kprintln!(
                "svm: mbguest runs one unmodified guest; it takes no grant server or scheduler"
            );
            return false;
        }
        true => match multiboot_guest() {
            Ok(g) => Some(g),
            Err(e) => {
                kprintln!("svm: {e}");
                return false;
            }
        },
    };
    let mut statuses = Vec::new();
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut ok = true;
    let mut runs = Vec::new();
    for n in list.split(',') {
        for (j, t) in transports.split(',').enumerate() {
            for (k, p) in policies.iter().enumerate() {
                for (l, g) in grants.iter().enumerate() {
                    runs.push((n, t, *p, *g, j == 0 && k == 0 && l == 0));
                }
            }
        }
    }
    for (name, transport, policy, grant, first_run) in runs {
        let mut with = String::new();
        if let Some(p) = policy {
            with.push_str(&format!(", scheduler {p}"));
        }
        if let Some(g) = grant {
            with.push_str(&format!(", grant server {g}"));
        }
        kprintln!("umbra: MMU implementation: {name} (transport {transport}{with})");
        let broken_grant = grant.is_some_and(|g| g.starts_with("misbehave-"));
        let broken = name.starts_with("misbehave-") || broken_grant;
        // A broken server's workloads are expected to stop: no test lines
        // of their own, the one `contain-` line below instead.
        let outcome = run_one(name, transport, test_mode && !broken, policy, grant, guest);
        let mut label = format!("{name}-{transport}");
        for extra in [policy, grant].into_iter().flatten() {
            label.push('-');
            label.push_str(extra);
        }
        let (p, f, run_ok) = match outcome {
            Ok(o) if broken => {
                // A broken grant server must also leave nothing behind
                // (the teardown gives every frame back) and, when its copy
                // plans are wild, copy nothing.
                let contained = o.stopped
                    && o.domains_stopped > 0
                    && (!broken_grant || o.clean)
                    && (grant != Some(WILD_PLANS) || o.copied == 0);
                if contained {
                    kprintln!(
                        "test contain-{label} ... ok ({} domains stopped; the kernel goes on)",
                        o.domains_stopped
                    );
                } else {
                    kprintln!(
                        "test contain-{label} ... FAILED: server stopped {}, domains stopped {}, \
                         teardown clean {}, bytes copied {}",
                        o.stopped,
                        o.domains_stopped,
                        o.clean,
                        o.copied
                    );
                }
                (contained as u32, !contained as u32, contained)
            }
            Ok(o) if guest.is_some() => {
                match o.guest_status {
                    Some(v) => kprintln!(
                        "svm: the unmodified guest on `{label}` wrote {v:#x} to its exit port"
                    ),
                    None => kprintln!(
                        "svm: the unmodified guest on `{label}` ended without writing its exit port"
                    ),
                }
                statuses.push(o.guest_status);
                (o.passed, o.failed, o.all_passed)
            }
            Ok(o) => (o.passed, o.failed, o.all_passed),
            Err(e) => {
                kprintln!("svm: run failed: {e}");
                if test_mode {
                    kprintln!("test svm-{label}-setup ... FAILED: {e}");
                }
                (0, 1, false)
            }
        };
        passed += p;
        failed += f;
        ok &= run_ok;
        if test_mode && !broken && first_run && name != RELAY && grant.is_none() {
            // The conformance scenarios on real frames (once per server).
            let (cp, cf) = conf::run_all(name);
            passed += cp;
            failed += cf;
        }
    }
    if guest.is_some() {
        // The guest's own verdict, as its runner reads it: QEMU exits with
        // (status << 1) | 1. Every server must agree; the first that
        // disagrees with the first run (or never wrote) decides.
        let first = statuses.first().copied().flatten();
        match statuses
            .iter()
            .find(|s| **s != first)
            .copied()
            .unwrap_or(first)
        {
            Some(v) => {
                kprintln!("umbra: ending with the guest's exit status {v:#x}");
                kernel::qemu::exit_with(v)
            }
            None => return false,
        }
    }
    if !test_mode {
        return ok;
    }
    match kernel::svm::decode::self_test() {
        Ok(()) => {
            passed += 1;
            kprintln!("test svm-decode ... ok");
        }
        Err(e) => {
            failed += 1;
            kprintln!("test svm-decode ... FAILED: {e}");
        }
    }
    kprintln!("umbra: svm-test: {passed} passed, {failed} failed");
    ok && failed == 0
}

/// The values of `key=A,B,...` on the command line (one `None` when the key
/// is absent), each a name of `known` or a test-only `misbehave-*` name;
/// None (after saying which) when one is neither.
fn choices(
    cmdline: &'static str,
    key: &str,
    what: &str,
    known: &[&str],
) -> Option<Vec<Option<&'static str>>> {
    let list: Vec<Option<&str>> = match kernel::boot::arg_value(cmdline, key) {
        None => alloc::vec![None],
        Some(list) => list.split(',').map(Some).collect(),
    };
    match list
        .iter()
        .flatten()
        .find(|n| !known.contains(n) && !n.starts_with("misbehave-"))
    {
        Some(bad) => {
            kprintln!("svm: no {what} named {bad:?}; known: {known:?}");
            None
        }
        None => Some(list),
    }
}

/// What one server's run came to.
struct Outcome {
    /// Test lines passed and failed (workloads and the teardown check).
    passed: u32,
    failed: u32,
    /// Every workload passed and the teardown was clean.
    all_passed: bool,
    /// The server was stopped during the run (the grant server, in a
    /// grant run with a broken one; else the MMU server).
    stopped: bool,
    /// Domains stopped because that server was.
    domains_stopped: u32,
    /// The teardown was clean (every domain destroyed, no shadow leak).
    clean: bool,
    /// Bytes the kernel copied for grant copies.
    copied: u64,
    /// What an unmodified guest wrote to its exit port, if it did.
    guest_status: Option<u32>,
}

/// Runs the workloads on server `name` over `transport`, then frees what
/// the run took (the pool, the task).
fn run_one(
    name: &str,
    transport: &str,
    test_mode: bool,
    policy: Option<&str>,
    grant: Option<&str>,
    guest: Option<&'static MultibootGuest>,
) -> Result<Outcome, String> {
    let pool = host::alloc_zeroed(SHADOW_POOL_FRAMES)?;
    let phys_bits = ((core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xFF) as u8).clamp(32, 52);
    let mut mirrors = Vec::new();
    let (server, control, task) = match transport {
        "direct" => {
            let (server, control) = direct_server(name, pool, phys_bits)?;
            (Transport::Direct(server), control, None)
        }
        _ if name == RELAY => {
            // Test-only: a relay task in front of the reference server's
            // task, which it calls through the kernel at PORT_MMU.
            let backend = task_server("reference", pool, phys_bits)?;
            kernel::task::set_port(abi::task::PORT_MMU as usize, Some(backend));
            let front = task_server(RELAY, pool, phys_bits)?;
            mirrors.push(backend);
            (Transport::Task(front), backend.control(), Some(front))
        }
        _ => {
            let task = task_server(name, pool, phys_bits)?;
            (Transport::Task(task), task.control(), Some(task))
        }
    };
    kprintln!("svm: MMU server `{name}` over real frames, MAXPHYADDR {phys_bits}");
    let specs = match guest {
        Some(g) => alloc::vec![DomainSpec::unmodified(g, MULTIBOOT_MEM_MIB)],
        None => specs(policy.is_some(), grant.is_some()),
    };
    let vcpus = specs.iter().map(|s| s.vcpus as usize).sum();
    let (sched, sched_task) = match policy {
        Some(p) => {
            let (s, t) = scheduler(p, transport, vcpus)?;
            kprintln!("svm: scheduler `{p}` over the {transport} transport");
            (Some(s), t)
        }
        None => (None, None),
    };
    let (grant_door, grant_task) = match grant {
        Some(g) => {
            // A grant task reaches the MMU server's task at PORT_MMU (the
            // relay's backend is there already).
            if let (Some(t), false) = (task, name == RELAY) {
                kernel::task::set_port(abi::task::PORT_MMU as usize, Some(t));
            }
            let (door, t) = grant_server(g, transport)?;
            kprintln!("svm: grant server `{g}` over the {transport} transport");
            (Some(door), t)
        }
        None => (None, None),
    };
    let result = kernel::svm::run(
        server,
        name,
        control,
        mirrors.clone(),
        &specs,
        sched,
        grant_door,
    );
    let finish = |task: Option<&'static Task>| {
        if let Some(t) = sched_task {
            t.destroy();
        }
        if let Some(t) = grant_task {
            kernel::task::set_port(abi::task::PORT_MMU as usize, None);
            t.destroy();
        }
        for m in &mirrors {
            kernel::task::set_port(abi::task::PORT_MMU as usize, None);
            m.destroy();
        }
        if let Some(t) = task {
            kprintln!(
                "svm: task `{name}`: longest call {} us (bound {} ms)",
                kernel::apic::tsc_to_us(t.longest_call()),
                kernel::task::REPLY_BOUND_MS
            );
            t.destroy();
        }
        host::free(pool, SHADOW_POOL_FRAMES);
    };
    let svm = match result {
        Ok(svm) => svm,
        Err(e) => {
            finish(task);
            return Err(e.into());
        }
    };
    let workloads_passed = report(svm, host::cpus_online(), test_mode);
    let goals = crate::grants::report(svm, test_mode);
    let teardown = kernel::svm::teardown(svm);
    let clean = teardown.clean();
    if test_mode {
        let label = crate::report::run_label(svm);
        if clean {
            kprintln!("test svm-{label}-teardown-no-leak ... ok");
        } else {
            kprintln!(
                "test svm-{label}-teardown-no-leak ... FAILED: {} shadow pages leaked",
                teardown.left
            );
        }
    }
    let doms = svm.domains();
    let passed = doms.iter().filter(|d| verdict(d).0).count() as u32;
    let grant_broken = grant.is_some_and(|g| g.starts_with("misbehave-"));
    let (stopped, why) = match grant_broken {
        true => (svm.grant_stopped(), "grant server stopped"),
        false => (svm.server_stopped(), "MMU server stopped"),
    };
    let domains_stopped = doms
        .iter()
        .filter(|d| matches!(*d.stop_reason.lock(), Some((w, _)) if w == why))
        .count() as u32;
    let copied = doms
        .iter()
        .map(|d| d.grant_copied.load(core::sync::atomic::Ordering::Relaxed))
        .sum();
    finish(task);
    let (gp, gf) = goals;
    Ok(Outcome {
        passed: passed + u32::from(clean) + gp,
        failed: doms.len() as u32 - passed + u32::from(!clean) + gf,
        all_passed: workloads_passed && clean && gf == 0,
        stopped,
        domains_stopped,
        clean,
        copied,
        guest_status: doms
            .first()
            .map(|d| d.exit_status.load(core::sync::atomic::Ordering::Acquire))
            .filter(|&v| guest.is_some() && v != NO_EXIT_STATUS)
            .map(|v| v as u32),
    })
}

/// Memory of an unmodified guest's domain (kvm-unit-tests' runner gives
/// its x86 tests 128 MiB).
pub const MULTIBOOT_MEM_MIB: u64 = 128;

/// The unmodified Multiboot kernel the boot modules hold (`mbguest`): module
/// 0 is the kernel, its string the file name then the guest's command
/// line; the other modules are the guest's, with their strings.
fn multiboot_guest() -> Result<&'static MultibootGuest, String> {
    let mods = kernel::modules();
    let Some((kernel_module, rest)) = mods.split_first() else {
        return Err("mbguest: no boot module holds a Multiboot kernel (QEMU -initrd)".into());
    };
    let cmdline = kernel_module
        .string()
        .split_once(' ')
        .map_or("", |(_, args)| args.trim());
    let modules: Vec<mboot::Module<'static>> = rest
        .iter()
        .map(|m| mboot::Module {
            bytes: m.bytes(),
            string: m.string(),
        })
        .collect();
    Ok(Box::leak(Box::new(MultibootGuest {
        image: kernel_module.bytes(),
        cmdline,
        modules: modules.leak(),
    })))
}

/// The embedded MMU server task image (built by `cargo xtask`; empty when
/// the kernel was built without it).
static MMU_TASK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mmu-task.elf"));

/// Loads the MMU server task, gives it the pool, and creates implementation
/// `name` in it.
fn task_server(name: &str, pool: u64, phys_bits: u8) -> Result<&'static Task, String> {
    let pool = (pool, SHADOW_POOL_FRAMES);
    load_task("MMU server", MMU_TASK, name, Some(pool), phys_bits)
}

/// Loads the task image `elf` (`what` in messages), maps the shadow pool
/// `(first byte, frames)` into it if given, and sends `Init` naming
/// `implementation`.
fn load_task(
    what: &str,
    elf: &[u8],
    implementation: &str,
    pool: Option<(u64, u64)>,
    phys_bits: u8,
) -> Result<&'static Task, String> {
    if elf.is_empty() {
        return Err(format!(
            "this image was built without the {what} task; build it with `cargo xtask run` \
             (or use transport=direct)"
        ));
    }
    let task = Task::load(
        &format!("{what}:{implementation}"),
        elf,
        host::cpus_online(),
    )
    .map_err(|e| format!("loading the {what} task: {e}"))?;
    let (pool_first, pool_frames) = pool.unwrap_or((0, 0));
    if pool_frames > 0 {
        task.map_window(pool_first, pool_frames * 4096, false)
            .map_err(|e| format!("mapping the shadow pool into the {what} task: {e}"))?;
    }
    let mut name = heapless::String::new();
    name.push_str(implementation)
        .map_err(|_| format!("implementation name {implementation:?} longer than 32 bytes"))?;
    let init = TaskInit {
        implementation: name,
        maxphyaddr: phys_bits,
        pool_first: Mfn(pool_first / 4096),
        pool_frames,
        pcpus: host::cpus_online() as u32,
    };
    let mut buf = [0u8; MAX_MESSAGE];
    let n = abi::encode(&init, &mut buf).map_err(|e| format!("{e:?}"))?;
    let mut out = [0u8; MAX_MESSAGE];
    let m = task
        .call(Op::Init, &buf[..n], &mut out)
        .map_err(|stop| format!("the {what} task stopped during init: {stop}"))?;
    match abi::decode::<TaskInitReply>(&out[..m]) {
        Ok(TaskInitReply::Ready(_)) => Ok(task),
        other => {
            task.destroy();
            Err(format!(
                "the {what} task refused {implementation:?}: {other:?}"
            ))
        }
    }
}

/// The embedded scheduler task image (built by `cargo xtask`; empty when
/// the image was built without it).
static SCHED_TASK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sched-task.elf"));

/// The scheduler server for one run: policy `policy` over `transport`, for
/// `vcpus` vCPUs. Returns it and its task (to destroy after the run).
fn scheduler(
    policy: &str,
    transport: &str,
    vcpus: usize,
) -> Result<(Scheduler, Option<&'static Task>), String> {
    let ncpu = host::cpus_online();
    if transport == "direct" {
        let server = sched::registry::create(policy).map_err(|e| format!("{e}"))?;
        return Ok((
            Scheduler::new(SchedTransport::Direct(server), policy, vcpus, ncpu),
            None,
        ));
    }
    let task = load_task("scheduler", SCHED_TASK, policy, None, 0)?;
    Ok((
        Scheduler::new(SchedTransport::Task(task), policy, vcpus, ncpu),
        Some(task),
    ))
}

/// The embedded grant server task image (built by `cargo xtask`; empty
/// when the image was built without it).
static GRANT_TASK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/grant-task.elf"));

/// The grant server's port to the MMU server when both are linked into the
/// kernel (the direct transport): the kernel's door, without carrying out
/// the reply's flush, which the grant server merges into its own reply.
struct KernelPort;

impl grant_server::MmuPort for KernelPort {
    fn call(&self, request: &abi::MmuRequest) -> abi::MmuReply {
        match kernel::svm::svm().mmu_for_server(request) {
            Ok(reply) => reply,
            // The MMU server stopped: every domain is being stopped; the
            // grant server answers its caller with this error.
            Err(_) => {
                abi::MmuReply::error(abi::mmu::MmuError::Unsupported(request.variant_index()))
            }
        }
    }
}

/// The grant server `name` over `transport`, and its task (to destroy
/// after the run).
fn grant_server(name: &str, transport: &str) -> Result<(GrantDoor, Option<&'static Task>), String> {
    if transport == "direct" {
        static PORT: KernelPort = KernelPort;
        let server = grant_server::registry::create(name, &PORT).map_err(|e| format!("{e}"))?;
        return Ok((GrantDoor::new(GrantTransport::Direct(server), name), None));
    }
    let task = load_task("grant server", GRANT_TASK, name, None, 0)?;
    Ok((GrantDoor::new(GrantTransport::Task(task), name), Some(task)))
}

/// Creates the MMU implementation `name` from `mmu_server::registry` (the
/// one place implementations are chosen) in the kernel, over real frames
/// (the direct transport).
fn direct_server(
    name: &str,
    pool: u64,
    phys_bits: u8,
) -> Result<(Box<dyn MmuServer>, &'static ControlPage), String> {
    let page = host::alloc_zeroed(1)?;
    // SAFETY: a fresh zeroed frame in the identity map, never freed: all
    // zeros is a valid ControlPage (atomics only).
    let control: &'static ControlPage = unsafe { &*(host::va(page) as *const ControlPage) };
    // SAFETY: the identity map (base 0) maps the pool and every guest range
    // the kernel lists, for as long as they are listed.
    let mem: &'static WindowMem = Box::leak(Box::new(unsafe {
        WindowMem::new(0, control, Mfn(pool / 4096), SHADOW_POOL_FRAMES)
    }));
    let config = mmu_server::Config {
        maxphyaddr: phys_bits,
        ..mmu_server::Config::default()
    };
    let server =
        mmu_server::registry::create_with(name, mem, config).map_err(|e| format!("{e}"))?;
    Ok((server, control))
}
