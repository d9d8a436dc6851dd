//! Each strategy against views built by hand.

use std::collections::{HashMap, HashSet};

use granary_actors::{GrainId, GrainKey};

use super::*;
use crate::membership::{DeviceLoad, Member, SiloLoad};

fn device(backend: &str, free_mib: u64, queue: u64, units: u32) -> DeviceLoad {
    DeviceLoad {
        backend: backend.into(),
        name: format!("{backend} device"),
        total_memory: 64 << 30,
        free_memory: free_mib << 20,
        queue_depth: queue,
        compute_units: units,
        ..DeviceLoad::default()
    }
}

fn member(address: &str, activations: u64, devices: Vec<DeviceLoad>) -> Member {
    Member {
        silo: SiloId::new(address, 1),
        gossip: "127.0.0.1:1".parse().ok(),
        load: SiloLoad {
            grain_types: Vec::new(),
            activations,
            devices,
            ..SiloLoad::default()
        },
    }
}

fn grain(key: u64) -> GrainId {
    GrainId {
        type_name: "tensor".into(),
        key: GrainKey::U64(key),
    }
}

fn place(
    strategy: &dyn PlacementStrategy,
    members: &[Member],
    needs: Option<&GpuNeeds>,
) -> Result<String, PlacementError> {
    let grain = grain(7);
    let caller = SiloId::new("a", 1);
    strategy
        .place(
            &PlacementRequest {
                grain: &grain,
                caller: &caller,
                needs,
            },
            members,
        )
        .map(|silo| silo.address)
}

fn mib(n: u64) -> GpuNeeds {
    GpuNeeds {
        device_memory: n << 20,
        ..GpuNeeds::default()
    }
}

#[test]
fn gpu_aware_picks_the_most_free_memory_among_devices_where_the_grain_fits() {
    let view = [
        member("a", 0, vec![device("Cpu", 512, 0, 8)]),
        member(
            "b",
            0,
            vec![device("Cuda", 3000, 9, 132), device("Cuda", 1000, 0, 132)],
        ),
        member("c", 0, vec![device("OpenCl", 2000, 0, 16)]),
    ];
    let gpu = GpuAware::strict();
    // b's best device has the most free memory.
    assert_eq!(place(&gpu, &view, Some(&mib(100))).unwrap(), "b");
    // Only c's and b's big device fit 2 GiB; b's has more free memory.
    assert_eq!(place(&gpu, &view, Some(&mib(2000))).unwrap(), "b");
    // A backend asked for.
    let opencl = GpuNeeds {
        backend: Some("OpenCl".into()),
        ..mib(10)
    };
    assert_eq!(place(&gpu, &view, Some(&opencl)).unwrap(), "c");
    // Compute units asked for rule out the OpenCL device and the CPU.
    let big = GpuNeeds {
        min_compute_units: 100,
        ..mib(10)
    };
    assert_eq!(place(&gpu, &view, Some(&big)).unwrap(), "b");
    // Nowhere fits 4 GiB: never placed where it does not fit.
    assert_eq!(
        place(&gpu, &view, Some(&mib(4000))),
        Err(PlacementError::NoDeviceFits { needs: mib(4000) })
    );
}

#[test]
fn placement_counts_free_memory_not_memory_lent_to_requests() {
    // a: 100 MiB free and 900 MiB lent to requests' working memory (it
    // comes back: a migration's target counts it as room); b: 500 MiB free
    // and 100 MiB kept by resident buffers.
    let busy = DeviceLoad {
        reserved_memory: 900 << 20,
        ..device("Cuda", 100, 0, 132)
    };
    let kept = DeviceLoad {
        reserved_memory: 100 << 20,
        kept_memory: 100 << 20,
        ..device("Cuda", 500, 0, 132)
    };
    assert_eq!((busy.room(), kept.room()), (1000 << 20, 500 << 20));
    let view = [member("a", 0, vec![busy]), member("b", 0, vec![kept])];
    let gpu = GpuAware::strict();
    // A first call goes where its memory is free now.
    assert_eq!(place(&gpu, &view, Some(&mib(200))).unwrap(), "b");
    assert_eq!(place(&gpu, &view, Some(&mib(10))).unwrap(), "b");
    assert_eq!(
        place(&gpu, &view, Some(&mib(800))),
        Err(PlacementError::NoDeviceFits { needs: mib(800) })
    );
}

#[test]
fn gpu_aware_breaks_ties_on_queue_then_id_and_falls_back_as_configured() {
    let view = [
        member("a", 5, vec![device("Cuda", 1000, 4, 132)]),
        member("b", 1, vec![device("Cuda", 1000, 2, 132)]),
        member("c", 9, vec![device("Cuda", 1000, 2, 132)]),
    ];
    // Equal memory: the shorter queue, then the lower id.
    assert_eq!(
        place(&GpuAware::strict(), &view, Some(&mib(10))).unwrap(),
        "b"
    );
    // None fits: to the CPU, on the silo with fewest activations.
    let fallback = GpuAware::with_cpu_fallback();
    assert_eq!(place(&fallback, &view, Some(&mib(5000))).unwrap(), "b");
    // A grain that needs no device goes to the fallback too.
    assert_eq!(place(&fallback, &view, None).unwrap(), "b");
    assert_eq!(
        place(&GpuAware::strict(), &[], Some(&mib(1))),
        Err(PlacementError::NoSilos)
    );
}

#[test]
fn the_cpu_backend_with_memory_limits_is_placed_on_by_free_memory() {
    // As the cluster tests configure it: CPU backends with memory limits.
    let view = [
        member("a", 0, vec![device("Cpu", 256, 0, 2)]),
        member("b", 0, vec![device("Cpu", 1024, 0, 2)]),
        member("c", 0, vec![device("Cpu", 768, 0, 2)]),
    ];
    let gpu = GpuAware::strict();
    assert_eq!(place(&gpu, &view, Some(&mib(300))).unwrap(), "b");
    assert!(place(&gpu, &view, Some(&mib(2048))).is_err());
}

#[test]
fn hash_placement_agrees_everywhere_and_moves_only_the_grains_of_a_silo_that_left() {
    let view: Vec<Member> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|address| member(address, 0, Vec::new()))
        .collect();
    let caller = SiloId::new("a", 1);
    let placed = |view: &[Member]| -> HashMap<u64, SiloId> {
        (0..2000)
            .map(|key| {
                let grain = grain(key);
                let request = PlacementRequest {
                    grain: &grain,
                    caller: &caller,
                    needs: None,
                };
                (key, HashPlacement.place(&request, view).unwrap())
            })
            .collect()
    };
    let before = placed(&view);
    assert_eq!(before, placed(&view), "deterministic");
    // Spread: every silo gets a fair share (400 expected).
    let mut counts: HashMap<&SiloId, usize> = HashMap::new();
    for silo in before.values() {
        *counts.entry(silo).or_default() += 1;
    }
    assert!(
        counts.values().all(|&n| (300..500).contains(&n)),
        "{counts:?}"
    );
    // Silo c leaves: only its grains move.
    let gone = SiloId::new("c", 1);
    let smaller: Vec<Member> = view.iter().filter(|m| m.silo != gone).cloned().collect();
    let after = placed(&smaller);
    for (key, silo) in &before {
        if *silo != gone {
            assert_eq!(&after[key], silo, "grain {key} moved needlessly");
        }
    }
}

#[test]
fn least_activations_prefer_local_and_random() {
    let view = [
        member("a", 7, Vec::new()),
        member("b", 3, Vec::new()),
        member("c", 3, Vec::new()),
    ];
    assert_eq!(place(&LeastActivations, &view, None).unwrap(), "b");
    assert_eq!(place(&PreferLocal, &view, None).unwrap(), "a");
    // The caller is not live: the hash's choice.
    assert!(place(&PreferLocal, &view[1..], None).is_ok());
    let random = RandomPlacement::default();
    let seen: HashSet<String> = (0..200)
        .map(|_| place(&random, &view, None).unwrap())
        .collect();
    assert_eq!(seen.len(), 3, "every silo is drawn");
    for strategy in [
        &LeastActivations as &dyn PlacementStrategy,
        &PreferLocal,
        &random,
        &HashPlacement,
    ] {
        assert_eq!(place(strategy, &[], None), Err(PlacementError::NoSilos));
    }
}
