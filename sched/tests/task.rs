//! The scheduler task's path on the host: `Init` bytes through
//! `task_rt::init::answer` create a policy from the registry by name, and
//! requests reach it through `abi::sched::dispatch`, as `sched-task` does.

use abi::sched::{dispatch, request, SchedReply, SchedRequest, PROTOCOL_VERSION};
use abi::task::{TaskInit, TaskInitReply};
use abi::{DomainId, Mfn, PcpuId, SchedServer, VcpuId, MAX_MESSAGE};
use sched::registry::{create, NAMES};

/// Sends `Init` naming `name` the way the kernel does; returns the reply
/// and the server the task would keep.
fn init(name: &str) -> (TaskInitReply, Option<Box<dyn SchedServer>>) {
    let mut implementation = heapless::String::new();
    implementation.push_str(name).expect("short name");
    let msg = TaskInit {
        implementation,
        maxphyaddr: 0,
        pool_first: Mfn(0),
        pool_frames: 0,
        pcpus: 8,
    };
    let mut bytes = [0u8; MAX_MESSAGE];
    let len = abi::encode(&msg, &mut bytes).expect("TaskInit encodes");
    let mut server = None;
    let mut reply = [0u8; MAX_MESSAGE];
    let n = task_rt::init::answer(&bytes[..len], &mut reply, |i| {
        server = create(&i.implementation).ok();
        server.is_some()
    });
    (abi::decode(&reply[..n]).expect("reply decodes"), server)
}

#[test]
fn every_policy_is_created_by_name_and_serves_its_protocol() {
    for &name in NAMES {
        let (reply, server) = init(name);
        assert!(
            matches!(&reply, TaskInitReply::Ready(n) if n == name),
            "{name}: {reply:?}"
        );
        let server = server.expect("created");
        let send = |req: SchedRequest| request(&req, |b, out| dispatch(&*server, b, out));
        let welcome = send(SchedRequest::Hello {
            version: PROTOCOL_VERSION,
        });
        let want = create(name).expect("registered").guarantees();
        assert_eq!(
            welcome,
            SchedReply::Welcome {
                version: PROTOCOL_VERSION,
                guarantees: want
            },
            "{name}"
        );
        let created = send(SchedRequest::CreateVcpu {
            vcpu: VcpuId(3),
            domain: DomainId(1),
            weight: abi::sched::DEFAULT_WEIGHT,
            hint: PcpuId(2),
        });
        assert!(
            matches!(created, SchedReply::Done { .. }),
            "{name}: {created:?}"
        );
        let picked = send(SchedRequest::PickNext { pcpu: PcpuId(2) });
        assert!(
            matches!(
                picked,
                SchedReply::Run {
                    vcpu: VcpuId(3),
                    ..
                }
            ),
            "{name}: {picked:?}"
        );
    }
}

#[test]
fn an_unknown_policy_is_named_back_and_nothing_is_created() {
    let (reply, server) = init("lottery");
    assert!(
        matches!(&reply, TaskInitReply::UnknownImplementation(n) if n == "lottery"),
        "{reply:?}"
    );
    assert!(server.is_none());
}
