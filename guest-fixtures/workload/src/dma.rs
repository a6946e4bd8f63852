//! A [`swiotlb::Policy`] as the virtio driver's DMA API ([`virtio::Dma`]): [`PolicyDma`],
//! for every workload and every pool policy (built-in or plug-in), and [`dma_error`], the
//! one translation of the pool's errors into the driver's, which keeps a refused conversion's
//! host status code.

use swiotlb::{Direction, MapError, Policy};
use virtio::{Dir, Dma, DmaError};

/// A pool policy as the driver's DMA API (streaming maps may block).
#[derive(Clone, Copy)]
pub struct PolicyDma<'a>(pub &'a dyn Policy);

/// The driver's view of a pool error: `Full` when completing requests may make room, the
/// host's status code for a conversion the host refused, else a short reason.
pub fn dma_error(e: MapError) -> DmaError {
    match e {
        MapError::NoSpace | MapError::TimedOut | MapError::TableFull | MapError::NoMemory => {
            DmaError::Full
        }
        MapError::InvalidArgument => DmaError::Failed("invalid argument"),
        MapError::TooLarge => DmaError::Failed("mapping too large"),
        MapError::NotMapped => DmaError::Failed("not mapped"),
        MapError::Mismatch => DmaError::Failed("length mismatch"),
        MapError::Conversion(c) => match c.status_code() {
            Some(code) => DmaError::Conversion(code),
            None => DmaError::Failed("conversion refused (alignment)"),
        },
    }
}

fn direction(d: Dir) -> Direction {
    match d {
        Dir::ToDevice => Direction::ToDevice,
        Dir::FromDevice => Direction::FromDevice,
    }
}

impl Dma for PolicyDma<'_> {
    fn alloc_coherent(&self, len: usize) -> Result<u64, DmaError> {
        self.0.alloc_coherent(len).map_err(dma_error)
    }

    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), DmaError> {
        self.0.free_coherent(addr, len).map_err(dma_error)
    }

    unsafe fn map(&self, buf: u64, len: usize, dir: Dir) -> Result<u64, DmaError> {
        // SAFETY: forwarded from the caller (the driver's `Dma::map` contract is the pool's).
        unsafe { self.0.map(buf, len, direction(dir), true) }.map_err(dma_error)
    }

    fn unmap(&self, dma: u64, len: usize, dir: Dir) -> Result<(), DmaError> {
        self.0.unmap(dma, len, direction(dir)).map_err(dma_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memconv::abi::ERR_NO_MEMORY;
    use swiotlb::host::HostPlatform;
    use swiotlb::{AnyPolicy, Config, ConvError};

    #[test]
    fn errors_keep_their_meaning_and_the_host_code() {
        assert_eq!(dma_error(MapError::NoSpace), DmaError::Full);
        assert_eq!(dma_error(MapError::TimedOut), DmaError::Full);
        assert_eq!(
            dma_error(MapError::Conversion(ConvError::Host(ERR_NO_MEMORY))),
            DmaError::Conversion(ERR_NO_MEMORY)
        );
        assert_eq!(
            dma_error(MapError::Conversion(ConvError::Stuck(ERR_NO_MEMORY))),
            DmaError::Conversion(ERR_NO_MEMORY)
        );
        assert!(matches!(
            dma_error(MapError::Conversion(ConvError::Refused)),
            DmaError::Failed(_)
        ));
    }

    #[test]
    fn a_policy_serves_the_driver() {
        let plat = HostPlatform::new(64 << 20);
        let cfg = Config::parse("policy=legacy pool=4M cpus=1").unwrap();
        let pool = AnyPolicy::new(&cfg, &plat).unwrap();
        let dma = PolicyDma(&pool);
        let data = std::vec![7u8; 4096];
        // SAFETY: `data` is this test's live buffer, left alone until the unmap below.
        let bounce = unsafe { dma.map(data.as_ptr() as u64, 4096, Dir::ToDevice) }.unwrap();
        assert!(plat.is_shared(bounce, 4096));
        dma.unmap(bounce, 4096, Dir::ToDevice).unwrap();
        assert_eq!(
            dma.unmap(bounce, 4096, Dir::ToDevice),
            Err(DmaError::Failed("not mapped"))
        );
        // A coherent allocation converts memory of its own: a refusal keeps the host's code.
        plat.fail_next_converts(1);
        assert_eq!(
            dma.alloc_coherent(4096),
            Err(DmaError::Conversion(ERR_NO_MEMORY))
        );
        let ring = dma.alloc_coherent(4096).unwrap();
        dma.free_coherent(ring, 4096).unwrap();
    }
}
