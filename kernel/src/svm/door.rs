//! The one door to the MMU server: the two transports, sending a request, carrying out the reply's flush, a stopped server.

use super::domain::Domain;
use super::stats::{self, bump, STATS};
use super::{host, online_mask};
use crate::task::{Stop, Task};
use abi::task::{ControlPage, Op};
use abi::{FlushObligation, FlushScope, MmuReply, MmuRequest, MmuServer, MAX_MESSAGE};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use spin::{Mutex, Once};

/// How the kernel reaches the MMU server: the choice `transport=` makes.
pub enum Transport {
    /// The server runs in ring 3 as a task of its own (the default).
    Task(&'static Task),
    /// The server is linked into the kernel and called in ring 0: the old
    /// way, kept so the cost of isolation is measured on the same runs.
    Direct(Box<dyn MmuServer>),
}

impl Transport {
    /// The transport's name on the command line and in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Task(_) => "task",
            Transport::Direct(_) => "direct",
        }
    }
}

/// The MMU server stopped: the request it was serving and why.
#[derive(Clone, Debug)]
pub struct ServerDown {
    /// What stopped it.
    pub cause: Stop,
}

/// Everything the SVM side shares between CPUs, for one run.
pub struct Svm {
    /// The MMU server (reached only through encoded bytes, see [`Svm::mmu`]).
    pub(super) server: Transport,
    /// The server implementation's registered name.
    pub name: String,
    /// What the server may touch besides its pool: the served guest ranges
    /// (for a task, its own control page; for the direct call, the
    /// kernel's), and the pool counters the server keeps there.
    pub(super) control: &'static ControlPage,
    /// Set once the server was stopped: it is never called again.
    pub(super) down: AtomicBool,
    /// Other tasks the served guests' memory is mapped into (servers the
    /// transport's task calls through the kernel and that touch guest
    /// memory themselves).
    pub(super) mirrors: Vec<&'static Task>,
    /// The scheduler server, when the run has one (else each pCPU
    /// round-robins the vCPUs pinned to it, in the kernel).
    pub sched: Option<super::sched::Scheduler>,
    /// The grant server, when the run has one (else the guests' grant
    /// hypercalls answer `NO_SERVER`).
    pub grant: Option<super::grant::GrantDoor>,
    /// All domains (set once, after they are created).
    pub domains: Once<Vec<&'static Domain>>,
    /// Each pCPU's vCPUs (pinned).
    pub(super) queues: Vec<Mutex<Vec<super::vcpu::Vcpu>>>,
    /// I/O permission map (all ones: every port intercepted).
    pub iopm_pa: u64,
    /// MSR permission map (all ones: every MSR intercepted).
    pub msrpm_pa: u64,
}

pub(super) static SVM: AtomicPtr<Svm> = AtomicPtr::new(core::ptr::null_mut());

/// The shared state of the run in progress (after [`run`] set it up).
pub fn svm() -> &'static Svm {
    let p = SVM.load(Ordering::Acquire);
    assert!(!p.is_null(), "svm used before setup");
    // SAFETY: every Svm stored here is leaked by `run` ('static) and never
    // freed; the pointer is only replaced by the next run's.
    unsafe { &*p }
}

impl Svm {
    /// The one door to the MMU server: encodes `req`, sends it over the
    /// transport on this pCPU, decodes the reply and carries out its flush
    /// obligation for `dom` (for every domain when `None`) before
    /// returning, so no caller can forget it. A reply that does not decode
    /// becomes an error reply, never a panic. When the server stops while
    /// serving (or has stopped before), it is reported with the request,
    /// every domain is stopped, and the caller gets [`ServerDown`].
    pub fn mmu(&self, dom: Option<&Domain>, req: &MmuRequest) -> Result<MmuReply, ServerDown> {
        let reply = self.mmu_for_server(req)?;
        match dom {
            Some(d) => self.carry_out(d, reply.flush()),
            None if reply.flush().is_some() => {
                // A whole-server answer concerns no one domain: carry it
                // out for each (a wider flush is always allowed).
                for d in self.domains.get().map(|v| v.as_slice()).unwrap_or(&[]) {
                    self.carry_out(d, reply.flush());
                }
            }
            None => {}
        }
        Ok(reply)
    }

    /// Sends `req` to the MMU server and returns its reply WITHOUT carrying
    /// out its flush obligation: only for another server (a grant server
    /// linked into the kernel) that merges the obligation into its own
    /// reply, which the kernel's door for that server carries out.
    /// Everything else goes through [`Svm::mmu`].
    pub fn mmu_for_server(&self, req: &MmuRequest) -> Result<MmuReply, ServerDown> {
        let me = host::cpu_index();
        bump(&STATS[me].mmu_calls);
        if self.down.load(Ordering::Acquire) {
            return Err(ServerDown {
                cause: Stop::AlreadyStopped,
            });
        }
        let mut buf = [0u8; MAX_MESSAGE];
        let n = match abi::encode(req, &mut buf) {
            Ok(n) => n,
            Err(_) => return Ok(MmuReply::error(abi::mmu::MmuError::Unsupported(0xFF))),
        };
        let mut out = [0u8; MAX_MESSAGE];
        let t0 = crate::apic::tsc();
        let m = match &self.server {
            Transport::Direct(server) => abi::dispatch(&**server, &buf[..n], &mut out),
            Transport::Task(task) => match task.call(Op::Request, &buf[..n], &mut out) {
                Ok(m) => m,
                Err(cause) => return Err(self.server_down(req, cause)),
            },
        };
        let reply = abi::decode::<MmuReply>(&out[..m])
            .unwrap_or_else(|e| MmuReply::error(abi::mmu::MmuError::Malformed(e)));
        stats::record_round_trip(me, crate::apic::tsc() - t0);
        Ok(reply)
    }

    /// Marks the server stopped after it stopped while serving `req`: the
    /// pCPU that saw the fault reports it (the others, which find the task
    /// already stopped, report nothing), every domain it serves is stopped,
    /// and the caller gets the error.
    fn server_down(&self, req: &MmuRequest, cause: Stop) -> ServerDown {
        // The pCPU that saw the fault reports it; the others, which find
        // the task already stopped, only stop their domains.
        self.down.store(true, Ordering::Release);
        if cause != Stop::AlreadyStopped {
            crate::kprintln!(
                "svm: MMU server `{}` STOPPED on pcpu {} while serving {:?}: {}",
                self.name,
                host::cpu_index(),
                req,
                cause
            );
        }
        for d in self.domains.get().map(|v| v.as_slice()).unwrap_or(&[]) {
            if !d.stopped.load(Ordering::Acquire) {
                d.stop("MMU server stopped", 0);
                host::kick(d.pcpus);
            }
        }
        ServerDown { cause }
    }

    /// Whether the server was stopped during this run.
    pub fn server_stopped(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// The transport's name (`task` or `direct`).
    pub fn transport(&self) -> &'static str {
        self.server.name()
    }

    /// Every domain of the run.
    pub fn domains(&self) -> &[&'static Domain] {
        self.domains.get().map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// Lets the server touch guest memory [pa, pa + bytes).
    pub(super) fn add_guest_range(&self, pa: u64, bytes: u64) -> Result<(), &'static str> {
        for m in &self.mirrors {
            m.map_window(pa, bytes, true)
                .map_err(|_| "cannot map a guest into a server task")?;
        }
        match &self.server {
            Transport::Task(t) => t
                .map_window(pa, bytes, true)
                .map_err(|_| "cannot map a guest into the server task"),
            Transport::Direct(_) => self
                .control
                .add_range(pa, bytes)
                .then_some(())
                .ok_or("the served-range table is full"),
        }
    }

    /// Withdraws a guest range (the server forgot the domain).
    pub(super) fn remove_guest_range(&self, pa: u64, bytes: u64) {
        for m in &self.mirrors {
            m.unmap_window(pa, bytes);
        }
        match &self.server {
            Transport::Task(t) => t.unmap_window(pa, bytes),
            Transport::Direct(_) => self.control.remove_range(pa),
        }
    }

    /// Shadow-pool frames in use now and at the peak.
    pub fn shadow_pages(&self) -> (u64, u64) {
        self.control.pool_usage()
    }

    /// Carries out a flush obligation for `dom`: every listed pCPU flushes
    /// the domain's ASID before its next VMRUN, remote ones are forced out
    /// of guest mode by the shootdown IPI and acknowledge; returns once all
    /// have. `AllReloadRoots` also voids every vCPU's root.
    fn carry_out(&self, dom: &Domain, flush: Option<FlushObligation>) {
        let Some(f) = flush else { return };
        let me = host::cpu_index();
        bump(&STATS[me].obligations);
        bump(&dom.obligations);
        let mut cpus = f.cpus.0 & online_mask();
        if f.scope == FlushScope::AllReloadRoots {
            dom.root_gen.fetch_add(1, Ordering::AcqRel);
            bump(&STATS[me].zaps);
            cpus |= dom.pcpus & online_mask();
        }
        if cpus == 0 {
            return;
        }
        let remote = (cpus & !(1u64 << me)).count_ones() as u64;
        STATS[me].ipis.fetch_add(remote, Ordering::Relaxed);
        STATS[me]
            .cpus_flushed
            .fetch_add(cpus.count_ones() as u64, Ordering::Relaxed);
        dom.shootdown_ipis.fetch_add(remote, Ordering::Relaxed);
        dom.cpus_flushed
            .fetch_add(cpus.count_ones() as u64, Ordering::Relaxed);
        host::guest_shootdown(cpus, dom.asid);
    }
}
