//! The raw `bpf()` interface: programs loaded from raw instructions (so they
//! need no object file), run by `BPF_PROG_TEST_RUN` once or in live-frames
//! mode, and attached with a link. The rate section's generator and dropper
//! and the per-packet floor (an empty program) are such programs; the Docker
//! section reads maps in batches through [`bpf`].
//!
//! Layouts follow `include/uapi/linux/bpf.h` (`union bpf_attr`).

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use lb_harness::packets::Run;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type` `BPF_XDP`.
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE`: native XDP (veth has it).
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// A program's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgType {
    /// `BPF_PROG_TYPE_XDP`, loaded for `BPF_XDP` attachment.
    Xdp,
    /// `BPF_PROG_TYPE_SCHED_CLS`: a TC classifier.
    SchedCls,
}

impl ProgType {
    /// `enum bpf_prog_type`.
    fn number(self) -> u32 {
        match self {
            ProgType::Xdp => 6,
            ProgType::SchedCls => 3,
        }
    }

    /// `expected_attach_type` at load.
    fn attach_type(self) -> u32 {
        match self {
            ProgType::Xdp => BPF_XDP,
            ProgType::SchedCls => 0,
        }
    }
}

/// `bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `bpf_attr` for `BPF_PROG_TEST_RUN`, up to `batch_size`.
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `bpf_attr` for `BPF_LINK_CREATE`, up to `flags`.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `struct xdp_md`, the context `BPF_PROG_TEST_RUN` takes for XDP.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// One `struct bpf_insn`: opcode, destination and source registers, 16-bit
/// offset, 32-bit immediate (8 bytes, host byte order).
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst & 0xf) << 8
        | u64::from(src & 0xf) << 12
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// `r0 = action; exit`.
pub fn return_program(action: u32) -> Vec<u64> {
    // BPF_ALU64 | BPF_MOV | BPF_K, then BPF_JMP | BPF_EXIT.
    vec![insn(0xb7, 0, 0, 0, action as i32), insn(0x95, 0, 0, 0, 0)]
}

/// `bpf(cmd, attr, size_of(attr))`: the result, or the error. On an error,
/// `attr` holds what the kernel wrote back before failing.
///
/// # Safety
///
/// `attr` must be a `repr(C)` prefix of `union bpf_attr` as `cmd` reads
/// it, and every buffer it points to must be valid for the reads and
/// writes `cmd` makes (the kernel zero-extends the rest).
pub unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller's contract; `attr` is exclusively borrowed and of
    // the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// [`bpf`] for a command that returns a new descriptor.
///
/// # Safety
///
/// As for [`bpf`].
unsafe fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: the caller's contract.
    let fd = unsafe { bpf(cmd, attr) }?;
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `xdp_md` context that makes a live-frames run "receive" a frame of
/// `len` bytes on `ifindex`: `data_end` = frame length, everything else 0.
pub fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let md = XdpMd {
        data: 0,
        data_end: u32::try_from(len).expect("frame length fits u32"),
        data_meta: 0,
        ingress_ifindex: ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    let mut out = [0u8; 24];
    for (i, v) in [
        md.data,
        md.data_end,
        md.data_meta,
        md.ingress_ifindex,
        md.rx_queue_index,
        md.egress_ifindex,
    ]
    .iter()
    .enumerate()
    {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    out
}

/// A program built from raw instructions and loaded with a `bpf()` call.
/// Unloaded when dropped.
#[derive(Debug)]
pub struct Program {
    fd: OwnedFd,
}

impl Program {
    /// Loads `r0 = action; exit` (an empty program when `action` is
    /// `XDP_PASS` or `TC_ACT_UNSPEC`) as a program of type `ty` named `name`.
    pub fn returning(ty: ProgType, action: u32, name: &str) -> Result<Program, String> {
        Program::load(ty, &return_program(action), name)
    }

    /// Loads `insns` as a program of type `ty` named `name`; if the kernel
    /// refuses it, the verifier's log is in the error.
    pub fn load(ty: ProgType, insns: &[u64], name: &str) -> Result<Program, String> {
        let license = b"GPL\0";
        let mut prog_name = [0u8; 16];
        let n = name.len().min(15);
        prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let mut attr = ProgLoad {
            prog_type: ty.number(),
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            expected_attach_type: ty.attach_type(),
            ..Default::default()
        };
        // SAFETY: `attr` is the `BPF_PROG_LOAD` prefix; the instructions
        // and the license outlive the call.
        if let Ok(fd) = unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) } {
            return Ok(Program { fd });
        }
        // Again, for the verifier's log.
        let mut log = vec![0u8; 256 * 1024];
        attr.log_level = 1;
        attr.log_size = log.len() as u32;
        attr.log_buf = log.as_mut_ptr() as u64;
        // SAFETY: as above; the log buffer is `log_size` bytes.
        let err = match unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) } {
            Ok(fd) => return Ok(Program { fd }),
            Err(e) => e,
        };
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        Err(format!(
            "BPF_PROG_LOAD of {name}: {err}; verifier log:\n{}",
            String::from_utf8_lossy(&log[..end])
        ))
    }

    /// Runs the program once on `input` (`repeat = 1`), as the harness's
    /// rig runs the data path's programs.
    pub fn test_run(&self, input: &[u8]) -> Result<Run, String> {
        let mut out = vec![0u8; input.len() + 256];
        let mut attr = TestRun {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: input.len() as u32,
            data_in: input.as_ptr() as u64,
            data_size_out: out.len() as u32,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: `attr` is the `BPF_PROG_TEST_RUN` prefix; the kernel
        // reads `data_size_in` bytes of `input` and writes at most
        // `data_size_out` bytes of `out`.
        unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }
            .map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
        out.truncate(attr.data_size_out as usize);
        Ok(Run {
            action: attr.retval,
            output: out,
            duration: Duration::from_nanos(attr.duration.into()),
        })
    }

    /// Runs an XDP program in live-frames mode on `repeat` copies of
    /// `frame`, `batch` frames at a time, as if received on `ifindex` of the
    /// calling thread's namespace (an `XDP_TX` program sends them out of
    /// that interface). Returns the wall time of the call.
    pub fn run_live(
        &self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
        batch: u32,
    ) -> Result<Duration, String> {
        let ctx = xdp_md(frame.len(), ifindex);
        let mut attr = TestRun {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: batch,
            ..Default::default()
        };
        let start = Instant::now();
        // SAFETY: `attr` is the `BPF_PROG_TEST_RUN` prefix; the kernel only
        // reads the frame and the context, of the sizes given.
        unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }
            .map_err(|e| format!("BPF_PROG_TEST_RUN (live frames, ifindex {ifindex}): {e}"))?;
        Ok(start.elapsed())
    }

    /// Attaches an XDP program in native mode to `ifindex` of the calling
    /// thread's namespace through a BPF link: detached when the returned
    /// link is dropped (or the process dies).
    pub fn attach_xdp(&self, ifindex: u32) -> Result<OwnedFd, String> {
        let mut attr = LinkCreate {
            prog_fd: self.fd.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: XDP_FLAGS_DRV_MODE,
        };
        // SAFETY: `attr` is the `BPF_LINK_CREATE` prefix; it holds no pointers.
        unsafe { bpf_fd(BPF_LINK_CREATE, &mut attr) }
            .map_err(|e| format!("BPF_LINK_CREATE (XDP on ifindex {ifindex}): {e}"))
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn bpf_attr_layouts_match_the_kernel() {
        assert_eq!(size_of::<ProgLoad>(), 72);
        assert_eq!(offset_of!(ProgLoad, insns), 8);
        assert_eq!(offset_of!(ProgLoad, license), 16);
        assert_eq!(offset_of!(ProgLoad, log_buf), 32);
        assert_eq!(offset_of!(ProgLoad, prog_name), 48);
        assert_eq!(offset_of!(ProgLoad, expected_attach_type), 68);
        assert_eq!(size_of::<TestRun>(), 80);
        assert_eq!(offset_of!(TestRun, data_in), 16);
        assert_eq!(offset_of!(TestRun, data_out), 24);
        assert_eq!(offset_of!(TestRun, repeat), 32);
        assert_eq!(offset_of!(TestRun, duration), 36);
        assert_eq!(offset_of!(TestRun, ctx_size_in), 40);
        assert_eq!(offset_of!(TestRun, ctx_in), 48);
        assert_eq!(offset_of!(TestRun, flags), 64);
        assert_eq!(offset_of!(TestRun, batch_size), 72);
        assert_eq!(size_of::<LinkCreate>(), 16);
        assert_eq!(size_of::<XdpMd>(), 24);
    }

    #[test]
    fn xdp_md_says_frame_length_and_ingress_interface() {
        let md = xdp_md(60, 7);
        let word = |i: usize| u32::from_ne_bytes(md[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), 0, "data");
        assert_eq!(word(1), 60, "data_end");
        assert_eq!(word(2), 0, "data_meta");
        assert_eq!(word(3), 7, "ingress_ifindex");
        assert_eq!(word(4), 0, "rx_queue_index");
        assert_eq!(word(5), 0, "egress_ifindex");
    }

    #[test]
    fn return_program_is_mov_r0_and_exit() {
        let bytes: Vec<u8> = return_program(3)
            .iter()
            .flat_map(|i| i.to_ne_bytes())
            .collect();
        assert_eq!(
            bytes,
            [0xb7, 0, 0, 0, 3, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0]
        );
    }
}
