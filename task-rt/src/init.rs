//! The `Init` message every server task answers the same way: decode the `TaskInit`, create the named server, reply.

use abi::task::{TaskInit, TaskInitReply};
use abi::MAX_MESSAGE;

/// Answers an `Op::Init` request: decodes `request` as a [`TaskInit`]
/// (bytes that do not decode get [`TaskInitReply::Malformed`]), lets
/// `create` make the implementation it names, and writes
/// [`TaskInitReply::Ready`] (`create` returned true: it made it) or
/// [`TaskInitReply::UnknownImplementation`] (false: no such name), both with
/// the name asked for, into `reply`. Returns the reply's length.
pub fn answer(
    request: &[u8],
    reply: &mut [u8; MAX_MESSAGE],
    create: impl FnOnce(&TaskInit) -> bool,
) -> usize {
    let answer = match abi::decode::<TaskInit>(request) {
        Err(_) => TaskInitReply::Malformed,
        Ok(init) if create(&init) => TaskInitReply::Ready(init.implementation),
        Ok(init) => TaskInitReply::UnknownImplementation(init.implementation),
    };
    // A TaskInitReply is a name of at most 32 bytes and a tag, far below
    // MAX_MESSAGE; 0 ("no reply") rather than a panic if that ever changed.
    abi::encode(&answer, reply).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::answer;
    use abi::task::{TaskInit, TaskInitReply};
    use abi::{Mfn, MAX_MESSAGE};

    fn init(name: &str) -> Vec<u8> {
        let mut implementation = heapless::String::new();
        implementation.push_str(name).unwrap();
        let msg = TaskInit {
            implementation,
            maxphyaddr: 46,
            pool_first: Mfn(0x100),
            pool_frames: 16,
            pcpus: 8,
        };
        let mut buf = [0u8; MAX_MESSAGE];
        let n = abi::encode(&msg, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    fn run(request: &[u8], known: &str) -> (TaskInitReply, Option<u32>) {
        let mut reply = [0u8; MAX_MESSAGE];
        let mut pcpus = None;
        let n = answer(request, &mut reply, |i| {
            pcpus = Some(i.pcpus);
            i.implementation == known
        });
        (abi::decode(&reply[..n]).unwrap(), pcpus)
    }

    #[test]
    fn a_known_name_is_ready_an_unknown_one_is_named_and_garbage_is_malformed() {
        let (r, pcpus) = run(&init("credit"), "credit");
        assert!(
            matches!(&r, TaskInitReply::Ready(n) if n == "credit"),
            "{r:?}"
        );
        assert_eq!(pcpus, Some(8));
        let (r, _) = run(&init("lottery"), "credit");
        assert!(
            matches!(&r, TaskInitReply::UnknownImplementation(n) if n == "lottery"),
            "{r:?}"
        );
        let (r, pcpus) = run(&[0xff; 3], "credit");
        assert_eq!(r, TaskInitReply::Malformed);
        assert_eq!(pcpus, None, "create must not run on a malformed init");
    }
}
