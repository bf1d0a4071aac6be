//! `kiln train --distributed mpi` (the `mpi` feature): one process per rank under `mpirun`, the gradients
//! summed between ranks through MPI (`kiln_nn::parallel::Collective`).

use kiln_nn::parallel::Collective;
use mpi::collective::SystemOperation;
use mpi::traits::*;

/// The MPI world of this process. MPI is finalised when it is dropped.
pub struct MpiWorld {
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    size: usize,
    library: String,
    // Last: dropping it finalises MPI, after everything above.
    _universe: mpi::environment::Universe,
}

impl MpiWorld {
    pub fn init() -> anyhow::Result<MpiWorld> {
        let universe = mpi::initialize().ok_or_else(|| anyhow::anyhow!("MPI was initialised twice"))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let library = mpi::environment::library_version().ok().and_then(|v| v.lines().next().map(|l| l.split(',').next().unwrap_or(l).trim().to_string())).unwrap_or_default();
        Ok(MpiWorld { world, rank, size, library, _universe: universe })
    }

    /// This rank's index among the ranks of its machine (what picks its adapter).
    pub fn local_rank(&self) -> usize {
        self.world.split_shared(self.rank as i32).rank() as usize
    }

    /// Ends the whole job (every rank) after this rank's error: no rank is left waiting in a collective.
    pub fn abort(&self) -> ! {
        self.world.abort(1)
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    /// A reduction to rank 0 then a broadcast of its result: every rank gets the same bits (an all-reduce
    /// is free to sum in another order on each rank).
    fn sum_f64(&self, data: &mut [f64]) -> kiln_graph::Result<()> {
        let root = self.world.process_at_rank(0);
        if self.rank == 0 {
            let mut total = vec![0f64; data.len()];
            root.reduce_into_root(&data[..], &mut total[..], SystemOperation::sum());
            data.copy_from_slice(&total);
        } else {
            root.reduce_into(&data[..], SystemOperation::sum());
        }
        root.broadcast_into(data);
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> kiln_graph::Result<Vec<u64>> {
        let mut all = vec![0u64; self.size];
        self.world.all_gather_into(&value, &mut all[..]);
        Ok(all)
    }
    fn describe(&self) -> String {
        format!("MPI, {} ranks ({})", self.size, self.library)
    }
}
