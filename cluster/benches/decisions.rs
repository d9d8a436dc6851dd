//! A placement decision and a cached directory lookup, each against its
//! goal of 1 µs.
//!
//! ```text
//! cargo bench -p granary-cluster --bench decisions
//! ```
//!
//! - `placement/gpu_aware/{8,64}_silos`: GPU-aware placement over a view of
//!   8 or 64 silos with 4 devices each (a grain needing 1 GiB, so every
//!   device is checked);
//! - `placement/hash/{8,64}_silos`: rendezvous hashing over the same view;
//! - `placement/least_activations/64_silos`;
//! - `directory/cached_lookup`: a hit in a location cache of 100 000
//!   grains; `directory/owner/64_silos`: which silo owns a grain's entry;
//! - `rebalance/round/64_silos_1000_grains`: one rebalancer round for a
//!   silo past high water with 1 000 GPU grains, against
//!   `rebalance/place_each/64_silos_1000_grains`: placing those grains one
//!   by one over the same view; `rebalance/round_local/...`: the same round
//!   when the silo's other devices have room, so grains move between its
//!   own devices.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use granary_actors::{GrainId, GrainKey};
use granary_cluster::{
    ActivationAddress, DeviceLoad, GpuAware, GpuNeeds, HashPlacement, LeastActivations,
    LocationCache, Member, PlacementRequest, PlacementStrategy, SiloId, SiloLoad, directory,
};

fn view(silos: usize) -> Vec<Member> {
    (0..silos)
        .map(|i| Member {
            silo: SiloId::new(format!("10.0.{}.{}:7000", i / 256, i % 256), 1),
            gossip: None,
            load: SiloLoad {
                grain_types: Vec::new(),
                activations: (i * 37 % 1000) as u64,
                devices: (0..4)
                    .map(|d| DeviceLoad {
                        backend: "Cuda".into(),
                        name: "H100".into(),
                        total_memory: 80 << 30,
                        free_memory: (((i * 7 + d * 13) % 80) as u64) << 30,
                        queue_depth: ((i + d) % 5) as u64,
                        compute_units: 132,
                        ..DeviceLoad::default()
                    })
                    .collect(),
                ..SiloLoad::default()
            },
        })
        .collect()
}

fn grain(key: u64) -> GrainId {
    GrainId {
        type_name: "tensor".into(),
        key: GrainKey::U64(key),
    }
}

fn placement(c: &mut Criterion) {
    let mut group = c.benchmark_group("placement");
    let needs = GpuNeeds {
        device_memory: 1 << 30,
        ..GpuNeeds::default()
    };
    let caller = SiloId::new("10.0.0.0:7000", 1);
    let grain = grain(42);
    let request = PlacementRequest {
        grain: &grain,
        caller: &caller,
        needs: Some(&needs),
    };
    let gpu = GpuAware::with_cpu_fallback();
    for silos in [8, 64] {
        let view = view(silos);
        group.bench_function(format!("gpu_aware/{silos}_silos"), |b| {
            b.iter(|| black_box(gpu.place(black_box(&request), &view)))
        });
        group.bench_function(format!("hash/{silos}_silos"), |b| {
            b.iter(|| black_box(HashPlacement.place(black_box(&request), &view)))
        });
    }
    let view = view(64);
    group.bench_function("least_activations/64_silos", |b| {
        b.iter(|| black_box(LeastActivations.place(black_box(&request), &view)))
    });
    group.finish();
}

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("directory");
    let cache = LocationCache::new();
    for key in 0..100_000 {
        cache.insert(
            grain(key),
            ActivationAddress {
                silo: SiloId::new(format!("10.0.0.{}:7000", key % 16), 1),
                activation: key,
            },
        );
    }
    let wanted = grain(54_321);
    group.bench_function("cached_lookup", |b| {
        b.iter(|| black_box(cache.get(black_box(&wanted))))
    });
    let view = view(64);
    group.bench_function("owner/64_silos", |b| {
        b.iter(|| black_box(directory::owner(black_box(&wanted), &view)))
    });
    group.finish();
}

/// A rebalancer round (`rebalance::plan`) for a silo of 1 000 GPU grains
/// in a view of 64 silos, against placing those 1 000 grains one by one
/// with `GpuAware` over the same view; and the same round when the silo's
/// other devices have room (`round_local`: the grains go to them).
fn rebalance(c: &mut Criterion) {
    use granary_cluster::rebalance::{Candidate, RebalanceConfig, Snapshot, plan};
    let mut group = c.benchmark_group("rebalance");
    let mut view = view(64);
    let types = vec!["tensor".to_string()];
    for member in &mut view {
        member.load.grain_types = types.clone();
    }
    // This silo: its first device past high water by 14 GiB, more than its
    // 900 grains that are not cooling weigh, and its other three devices
    // at 90% (above the fill limit, not past high water), so the round
    // looks for a target for every grain among its own devices first and
    // then among the other 63 silos.
    view[0].load.devices[0].free_memory = 2 << 30;
    for device in &mut view[0].load.devices[1..] {
        device.free_memory = 8 << 30;
    }
    let grains: Vec<Candidate> = (0..1_000)
        .map(|key| Candidate {
            grain: grain(key),
            bytes: 14 << 20,
            idle_for: std::time::Duration::from_millis(key * 37 % 10_000),
            cooling: key % 10 == 0,
            device: Some(0),
            movable: true,
            local: true,
            away: true,
        })
        .collect();
    let me = view[0].silo.clone();
    let sent = std::collections::HashMap::new();
    let type_needs = std::collections::HashMap::new();
    let config = RebalanceConfig {
        moves_per_round: 1_000,
        ..RebalanceConfig::default()
    };
    let snapshot = Snapshot {
        me: &me,
        view: &view,
        grains: &grains,
        sent: &sent,
        long_queue_rounds: 0,
        needs: &type_needs,
    };
    group.bench_function("round/64_silos_1000_grains", |b| {
        b.iter(|| black_box(plan(&config, black_box(&snapshot))))
    });
    let mut roomy = view.clone();
    for device in &mut roomy[0].load.devices[1..] {
        device.free_memory = 70 << 30;
    }
    let local = Snapshot {
        view: &roomy,
        ..snapshot
    };
    group.bench_function("round_local/64_silos_1000_grains", |b| {
        b.iter(|| black_box(plan(&config, black_box(&local))))
    });
    let needs = GpuNeeds {
        device_memory: 14 << 20,
        ..GpuNeeds::default()
    };
    let gpu = GpuAware::with_cpu_fallback();
    group.bench_function("place_each/64_silos_1000_grains", |b| {
        b.iter(|| {
            for candidate in &grains {
                let request = PlacementRequest {
                    grain: &candidate.grain,
                    caller: &me,
                    needs: Some(&needs),
                };
                black_box(gpu.place(black_box(&request), &view).ok());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, placement, lookups, rebalance);
criterion_main!(benches);
