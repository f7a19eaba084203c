//! Thin syscall helpers over rustix: SCM_RIGHTS passing ([`scm`]), the publish clock
//! ([`clock`]) and CPU pinning ([`cpu`]).
#![allow(unsafe_code)]

pub mod clock;
pub mod cpu;
pub mod scm;
