//! Reverse maps in bounded descriptors: a key (gfn or shadow page) -> the
//! shadow entries (host-physical addresses) that point at it.
//!
//! A list with one entry lives inline in its head; longer lists live in
//! fixed-size descriptors from a shared pool with a free list, so adding an
//! entry allocates at most one descriptor of [`DESC_LEN`] slots and the pool
//! never grows beyond the number of live entries / 1 + the number of lists.

use super::Vec;
use abi::Hpa;

/// Slots per descriptor.
pub const DESC_LEN: usize = 7;
const NONE: u32 = u32::MAX;

/// The head of one list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Head {
    /// No entry.
    #[default]
    Empty,
    /// Exactly one entry, inline.
    One(Hpa),
    /// Two or more entries, in the descriptor chain starting here.
    Many(u32),
}

#[derive(Clone, Copy, Debug)]
struct Desc {
    slots: [u64; DESC_LEN],
    len: u8,
    next: u32,
}

/// The descriptor pool shared by all lists of a domain.
#[derive(Debug, Default)]
pub struct Pool {
    descs: Vec<Desc>,
    free: u32,
    live: usize,
}

impl Pool {
    /// An empty pool.
    pub const fn new() -> Self {
        Self {
            descs: Vec::new(),
            free: NONE,
            live: 0,
        }
    }

    /// Descriptors in use.
    pub fn live(&self) -> usize {
        self.live
    }

    fn alloc(&mut self, first: &[u64]) -> u32 {
        let mut d = Desc {
            slots: [0; DESC_LEN],
            len: first.len() as u8,
            next: NONE,
        };
        d.slots[..first.len()].copy_from_slice(first);
        self.live += 1;
        if self.free != NONE {
            let i = self.free;
            self.free = self.descs[i as usize].next;
            self.descs[i as usize] = d;
            i
        } else {
            self.descs.push(d);
            (self.descs.len() - 1) as u32
        }
    }

    fn release(&mut self, i: u32) {
        self.descs[i as usize].next = self.free;
        self.descs[i as usize].len = 0;
        self.free = i;
        self.live -= 1;
    }

    /// Adds `e` to the list (duplicates are the caller's bug; not checked).
    pub fn add(&mut self, head: &mut Head, e: Hpa) {
        match *head {
            Head::Empty => *head = Head::One(e),
            Head::One(a) => *head = Head::Many(self.alloc(&[a.0, e.0])),
            Head::Many(first) => {
                let d = &mut self.descs[first as usize];
                if (d.len as usize) < DESC_LEN {
                    d.slots[d.len as usize] = e.0;
                    d.len += 1;
                } else {
                    let n = self.alloc(&[e.0]);
                    self.descs[n as usize].next = first;
                    *head = Head::Many(n);
                }
            }
        }
    }

    /// Removes `e` from the list; returns whether it was there.
    pub fn remove(&mut self, head: &mut Head, e: Hpa) -> bool {
        match *head {
            Head::Empty => false,
            Head::One(a) => {
                if a == e {
                    *head = Head::Empty;
                }
                a == e
            }
            Head::Many(first) => {
                let mut at = first;
                while at != NONE {
                    let d = self.descs[at as usize];
                    if let Some(pos) = d.slots[..d.len as usize].iter().position(|&s| s == e.0) {
                        // Fill the hole with the last slot of the first desc.
                        let f = &mut self.descs[first as usize];
                        let last = f.slots[f.len as usize - 1];
                        f.len -= 1;
                        self.descs[at as usize].slots[pos] = last;
                        self.normalize(head);
                        return true;
                    }
                    at = d.next;
                }
                false
            }
        }
    }

    fn normalize(&mut self, head: &mut Head) {
        let Head::Many(first) = *head else { return };
        let f = self.descs[first as usize];
        if f.len == 0 {
            self.release(first);
            *head = if f.next == NONE {
                Head::Empty
            } else {
                Head::Many(f.next)
            };
            self.normalize(head);
        } else if f.len == 1 && f.next == NONE {
            self.release(first);
            *head = Head::One(Hpa(f.slots[0]));
        }
    }

    /// Calls `f` for every entry (in no particular order).
    pub fn for_each(&self, head: &Head, mut f: impl FnMut(Hpa)) {
        match *head {
            Head::Empty => {}
            Head::One(a) => f(a),
            Head::Many(mut at) => {
                while at != NONE {
                    let d = &self.descs[at as usize];
                    d.slots[..d.len as usize].iter().for_each(|&s| f(Hpa(s)));
                    at = d.next;
                }
            }
        }
    }

    /// The entries, collected (for callers that modify lists meanwhile).
    pub fn collect(&self, head: &Head) -> Vec<Hpa> {
        let mut v = Vec::new();
        self.for_each(head, |e| v.push(e));
        v
    }

    /// Frees every descriptor of the list.
    pub fn clear(&mut self, head: &mut Head) {
        if let Head::Many(mut at) = *head {
            while at != NONE {
                let next = self.descs[at as usize].next;
                self.release(at);
                at = next;
            }
        }
        *head = Head::Empty;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_then_descriptors_then_back() {
        let mut p = Pool::new();
        let mut h = Head::Empty;
        p.add(&mut h, Hpa(8));
        assert_eq!(h, Head::One(Hpa(8)));
        assert_eq!(p.live(), 0);
        for i in 2..=20u64 {
            p.add(&mut h, Hpa(8 * i));
        }
        assert_eq!(p.collect(&h).len(), 20);
        assert_eq!(p.live(), 3);
        for i in 1..=19u64 {
            assert!(p.remove(&mut h, Hpa(8 * i)), "entry {i}");
            assert!(!p.remove(&mut h, Hpa(8 * i)));
            assert_eq!(p.collect(&h).len(), 20 - i as usize);
        }
        assert_eq!(h, Head::One(Hpa(160)));
        assert_eq!(p.live(), 0);
        p.add(&mut h, Hpa(1));
        p.clear(&mut h);
        assert_eq!((h, p.live()), (Head::Empty, 0));
    }
}
