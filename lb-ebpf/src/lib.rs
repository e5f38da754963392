//! Packet logic of the `lb` data path: parsing, checksums, the flow hash,
//! backend selection and reply matching, and the address rewrite that both
//! the XDP and the skb path carry out.
//!
//! It works on raw `[start, end)` packet pointers, exactly as the kernel hands
//! them to XDP and TC programs, and checks every access against `end` itself,
//! so the verifier sees each bound. The same code builds for the host, where
//! the unit tests run it on byte buffers.
#![cfg_attr(not(test), no_std)]

pub mod csum;
pub mod flow;
pub mod hash;
pub mod nat;
pub mod parse;

/// Returns a pointer to a `T` at `offset` in `[start, end)`, or `None` if the
/// `T` would reach past `end`.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    let size = core::mem::size_of::<T>();
    if start + offset + size > end {
        return None;
    }
    Some((start + offset) as *mut T)
}
