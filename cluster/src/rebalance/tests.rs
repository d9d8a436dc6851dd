use std::collections::{HashMap, HashSet};

use granary_actors::GrainKey;

use super::*;
use crate::membership::SiloLoad;

const MIB: u64 = 1 << 20;

fn device(total_mib: u64, used_mib: u64) -> DeviceLoad {
    DeviceLoad {
        backend: "Cpu".into(),
        name: "cpu".into(),
        total_memory: total_mib * MIB,
        free_memory: (total_mib - used_mib) * MIB,
        compute_units: 8,
        ..DeviceLoad::default()
    }
}

fn member(address: &str, devices: Vec<DeviceLoad>) -> Member {
    Member {
        silo: SiloId::new(address, 1),
        gossip: None,
        load: SiloLoad {
            devices,
            grain_types: vec!["Tensor".into()],
            ..SiloLoad::default()
        },
    }
}

fn grain(key: u64) -> GrainId {
    GrainId {
        type_name: "Tensor".into(),
        key: GrainKey::U64(key),
    }
}

fn candidates(keys: impl IntoIterator<Item = u64>) -> Vec<Candidate> {
    keys.into_iter()
        .map(|key| Candidate {
            grain: grain(key),
            bytes: MIB,
            // Lower keys idle longer.
            idle_for: Duration::from_secs(1_000 - key),
            cooling: false,
            device: Some(0),
            movable: true,
            local: true,
            away: true,
        })
        .collect()
}

fn config() -> RebalanceConfig {
    RebalanceConfig {
        shed_idle: Duration::from_secs(100),
        ..RebalanceConfig::default()
    }
}

fn plan_for(config: &RebalanceConfig, me: &str, view: &[Member], grains: &[Candidate]) -> Plan {
    plan(
        config,
        &Snapshot {
            me: &SiloId::new(me, 1),
            view,
            grains,
            sent: &HashMap::new(),
            long_queue_rounds: 0,
            needs: &HashMap::new(),
        },
    )
}

fn fraction(member: &Member) -> f64 {
    let total: u64 = member.load.devices.iter().map(|d| d.total_memory).sum();
    let used: u64 = member.load.devices.iter().map(used).sum();
    used as f64 / total as f64
}

#[test]
fn a_silo_that_joins_empty_takes_the_full_silos_excess_and_the_spread_closes() {
    let config = config();
    // Two silos at 95% (19 grains of 1 MiB on 20 MiB each), a third empty.
    let mut view = vec![
        member("a", vec![device(20, 19)]),
        member("b", vec![device(20, 19)]),
        member("c", vec![device(20, 0)]),
    ];
    let mut grains: HashMap<&str, Vec<Candidate>> = HashMap::new();
    grains.insert("a", candidates(0..19));
    grains.insert("b", candidates(100..119));
    grains.insert("c", Vec::new());
    let mut moved = HashSet::new();
    let mut rounds = 0;
    loop {
        // Every silo decides from the same view, as it would from gossip.
        let plans: Vec<(&str, Plan)> = ["a", "b", "c"]
            .into_iter()
            .map(|me| (me, plan_for(&config, me, &view, &grains[me])))
            .collect();
        if plans.iter().all(|(_, plan)| plan.moves.is_empty()) {
            break;
        }
        rounds += 1;
        assert!(rounds <= 4, "still moving after {rounds} rounds");
        for (from, plan) in plans {
            assert!(plan.moves.len() <= config.moves_per_round);
            assert!(plan.shed.is_empty());
            for mv in plan.moves {
                // 95% is past high water: those moves come first.
                assert!(matches!(mv.reason, Reason::HighWater | Reason::Spread));
                assert!(moved.insert(mv.grain.clone()), "{} moved twice", mv.grain);
                let to = mv.to.silo().expect("a move away").address.as_str();
                let index = |view: &[Member], name: &str| {
                    view.iter().position(|m| m.silo.address == name).unwrap()
                };
                let (source, target) = (index(&view, from), index(&view, to));
                view[source].load.devices[0].free_memory += mv.bytes;
                view[target].load.devices[0].free_memory -= mv.bytes;
                let list = grains.get_mut(from).unwrap();
                let at = list.iter().position(|c| c.grain == mv.grain).unwrap();
                let mut candidate = list.remove(at);
                // Rule 6: it cools down where it arrives.
                candidate.cooling = true;
                grains.get_mut(to).unwrap().push(candidate);
            }
        }
    }
    let fractions: Vec<f64> = view.iter().map(fraction).collect();
    let spread = fractions.iter().cloned().fold(f64::MIN, f64::max)
        - fractions.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        spread < 0.2,
        "spread {spread} after {rounds} rounds: {fractions:?}"
    );
    // The empty silo took about a third: never past the mean.
    assert!(fractions[2] <= 38.0 / 60.0 + 1e-9, "{fractions:?}");
    assert!(
        rounds >= 2,
        "the per-round limit spreads the moves over rounds"
    );
}

#[test]
fn silos_within_the_margin_stay_put() {
    let view = vec![
        member("a", vec![device(100, 70)]),
        member("b", vec![device(100, 62)]),
        member("c", vec![device(100, 58)]),
    ];
    let plan = plan_for(&config(), "a", &view, &candidates(0..70));
    assert_eq!(plan, Plan::default());
}

#[test]
fn a_device_past_high_water_sheds_down_to_the_hysteresis_and_never_fills_a_target_past_it() {
    let config = RebalanceConfig {
        moves_per_round: 100,
        ..config()
    };
    let view = vec![
        member("a", vec![device(100, 95)]),
        member("b", vec![device(100, 76)]),
        member("c", vec![device(100, 10)]),
    ];
    let plan = plan_for(&config, "a", &view, &candidates(0..95));
    // 95 MiB down to 80 MiB: 15 grains, to the emptiest target while it is
    // so, never taking a target past 80%.
    assert_eq!(plan.moves.len(), 15);
    assert!(plan.moves.iter().all(|mv| mv.reason == Reason::HighWater));
    let to_b = plan
        .moves
        .iter()
        .filter(|mv| mv.to.silo().is_some_and(|to| to.address == "b"))
        .count();
    assert!(to_b <= 4, "b would pass 80%: {to_b}");
    // Oldest idle first.
    let keys: Vec<_> = plan.moves.iter().map(|mv| mv.grain.clone()).collect();
    assert_eq!(keys, (0..15).map(grain).collect::<Vec<_>>());
    assert!(plan.shed.is_empty());
}

#[test]
fn with_no_room_anywhere_pressure_deactivates_the_grains_idle_longest() {
    let view = vec![
        member("a", vec![device(10, 10)]),
        member("b", vec![device(10, 9)]),
    ];
    let mut grains = candidates(0..10);
    // Only the first three have been idle long enough to shed.
    for (n, candidate) in grains.iter_mut().enumerate() {
        candidate.idle_for = Duration::from_secs(if n < 3 { 500 - n as u64 } else { 5 });
    }
    let plan = plan_for(&config(), "a", &view, &grains);
    assert!(plan.moves.is_empty());
    // 10 MiB down to 8 MiB: two grains, idle longest first.
    assert_eq!(plan.shed, vec![grain(0), grain(1)]);
}

#[test]
fn grains_that_moved_recently_never_move_again_within_the_cool_down() {
    let view = vec![
        member("a", vec![device(20, 19)]),
        member("c", vec![device(20, 0)]),
    ];
    let mut grains = candidates(0..19);
    for candidate in &mut grains {
        candidate.cooling = true;
    }
    assert_eq!(plan_for(&config(), "a", &view, &grains), Plan::default());
    grains[7].cooling = false;
    let plan = plan_for(&config(), "a", &view, &grains);
    assert_eq!(plan.moves.len(), 1);
    assert_eq!(plan.moves[0].grain, grain(7));
}

#[test]
fn grains_idle_alike_are_planned_in_the_order_given_and_those_left_out_make_way() {
    let view = vec![
        member("a", vec![device(100, 70)]),
        member("c", vec![device(100, 10)]),
    ];
    // Busy grains all idle 0: a tie.
    let mut grains = candidates(0..70);
    for candidate in &mut grains {
        candidate.idle_for = Duration::ZERO;
    }
    let planned = |grains: &[Candidate]| -> Vec<GrainId> {
        let plan = plan_for(&config(), "a", &view, grains);
        plan.moves.into_iter().map(|mv| mv.grain).collect()
    };
    // The same first grains each round...
    assert_eq!(planned(&grains), (0..4).map(grain).collect::<Vec<_>>());
    // ...unless those whose moves away failed lately may not move away
    // (`node/rebalance.rs` rule 6): then the next ones are tried, and they
    // are not shed in their place.
    for candidate in &mut grains[..4] {
        candidate.away = false;
    }
    assert_eq!(planned(&grains), (4..8).map(grain).collect::<Vec<_>>());
    let plan = plan_for(&config(), "a", &view, &grains[..4]);
    assert!(plan.moves.is_empty() && plan.shed.is_empty(), "{plan:?}");
}

#[test]
fn past_high_water_a_grain_barred_from_moving_away_is_shed_like_one_that_cannot_move() {
    // Both silos past high water: nowhere to move, so the idlest are shed.
    let view = vec![
        member("a", vec![device(100, 95)]),
        member("b", vec![device(100, 95)]),
    ];
    let config = RebalanceConfig {
        shed_idle: Duration::from_secs(1),
        ..config()
    };
    let mut grains = candidates(0..95);
    let plan = plan_for(&config, "a", &view, &grains);
    assert!(plan.moves.is_empty(), "{plan:?}");
    let idlest = plan.shed.clone();
    assert_eq!(idlest.first(), Some(&grain(0)), "{plan:?}");
    // Grain 0 barred from moving away (`node/rebalance.rs` rule 6) is
    // still shed first, not passed over for busier ones.
    grains[0].away = false;
    let plan = plan_for(&config, "a", &view, &grains);
    assert_eq!(plan.shed, idlest, "{plan:?}");
    // And with room elsewhere, it is shed while the others move.
    let view = vec![
        member("a", vec![device(100, 95)]),
        member("c", vec![device(100, 10)]),
    ];
    let plan = plan_for(&config, "a", &view, &grains);
    assert!(plan.moves.iter().all(|mv| mv.grain != grain(0)), "{plan:?}");
    assert_eq!(plan.shed, [grain(0)], "{plan:?}");
}

#[test]
fn targets_that_leave_are_fenced_or_host_another_type_take_nothing() {
    let mut leaving = member("l", vec![device(20, 0)]);
    leaving.load.leaving = true;
    let mut fenced = member("f", vec![device(20, 0)]);
    fenced.load.fenced = true;
    let mut other = member("o", vec![device(20, 0)]);
    other.load.grain_types = vec!["Other".into()];
    let view = vec![member("a", vec![device(20, 19)]), leaving, fenced, other];
    let plan = plan_for(&config(), "a", &view, &candidates(0..19));
    assert!(plan.moves.is_empty(), "{plan:?}");
}

#[test]
fn what_this_silo_sent_counts_against_its_target_until_its_load_shows_it() {
    // `a` sent 9 of its 19 grains to `c`, whose published load does not
    // show them yet.
    let view = vec![
        member("a", vec![device(20, 10)]),
        member("c", vec![device(20, 0)]),
    ];
    let grains = candidates(9..19);
    let me = SiloId::new("a", 1);
    // Read alone, the view would send 5 more.
    let unlimited = RebalanceConfig {
        moves_per_round: 100,
        ..config()
    };
    assert_eq!(plan_for(&unlimited, "a", &view, &grains).moves.len(), 5);
    let sent: HashMap<SiloId, u64> = [(SiloId::new("c", 1), 9 * MIB)].into();
    let plan = plan(
        &unlimited,
        &Snapshot {
            me: &me,
            view: &view,
            grains: &grains,
            sent: &sent,
            long_queue_rounds: 0,
            needs: &HashMap::new(),
        },
    );
    assert!(plan.moves.is_empty(), "{plan:?}");
}

#[test]
fn a_queue_long_for_rounds_moves_the_busiest_grain_to_an_idle_like_device() {
    let config = config();
    let mut busy = device(100, 50);
    busy.queue_depth = 64;
    let mut idle = device(100, 50);
    idle.queue_depth = 0;
    let mut other_backend = device(100, 50);
    other_backend.backend = "Cuda".into();
    let view = vec![
        member("a", vec![busy.clone()]),
        member("b", vec![idle]),
        member("z", vec![other_backend]),
    ];
    let grains = candidates(0..10);
    let me = SiloId::new("a", 1);
    let sent = HashMap::new();
    let needs = HashMap::new();
    let snapshot = |rounds| Snapshot {
        me: &me,
        view: &view,
        grains: &grains,
        sent: &sent,
        long_queue_rounds: rounds,
        needs: &needs,
    };
    assert!(long_queue(&config, std::slice::from_ref(&busy)));
    assert!(plan(&config, &snapshot(2)).moves.is_empty());
    let plan = plan(&config, &snapshot(3));
    assert_eq!(
        plan.moves,
        vec![Move {
            grain: grain(9),
            to: Destination::Silo(SiloId::new("b", 1)),
            bytes: MIB,
            reason: Reason::Queue,
        }]
    );
}

#[test]
fn settings_out_of_range_are_refused() {
    assert!(RebalanceConfig::default().validate().is_ok());
    for bad in [
        RebalanceConfig {
            high_water: 1.5,
            ..RebalanceConfig::default()
        },
        RebalanceConfig {
            margin: f64::NAN,
            ..RebalanceConfig::default()
        },
        RebalanceConfig {
            hysteresis: 0.9,
            ..RebalanceConfig::default()
        },
        RebalanceConfig {
            high_water: 0.0,
            hysteresis: 0.0,
            ..RebalanceConfig::default()
        },
        RebalanceConfig {
            queue_depth: 0,
            ..RebalanceConfig::default()
        },
        RebalanceConfig {
            interval: Duration::ZERO,
            ..RebalanceConfig::default()
        },
        RebalanceConfig {
            moves_per_round: 0,
            ..RebalanceConfig::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn on_a_silo_of_two_devices_only_grains_on_the_one_past_high_water_go() {
    let config = RebalanceConfig {
        moves_per_round: 100,
        ..config()
    };
    // Device 0 at 95%, device 1 at 85%: past the fill limit itself, so
    // the grains go to another silo.
    let view = vec![
        member("a", vec![device(20, 19), device(20, 17)]),
        member("c", vec![device(40, 0)]),
    ];
    let mut grains = candidates(0..21);
    for candidate in &mut grains {
        // The two idle longest are on device 1.
        candidate.device = Some(
            if candidate.grain.key == GrainKey::U64(0) || candidate.grain.key == GrainKey::U64(1) {
                1
            } else {
                0
            },
        );
    }
    let plan = plan_for(&config, "a", &view, &grains);
    // 19 MiB down to 16 on device 0: three of its grains, none of device 1.
    let moved: Vec<_> = plan.moves.iter().map(|mv| mv.grain.clone()).collect();
    assert_eq!(moved, vec![grain(2), grain(3), grain(4)], "{plan:?}");
    assert!(
        plan.moves
            .iter()
            .all(|mv| mv.to == Destination::Silo(SiloId::new("c", 1)))
    );
    // A grain whose device is not known counts on no device of two.
    for candidate in &mut grains {
        candidate.device = None;
    }
    assert_eq!(plan_for(&config, "a", &view, &grains), Plan::default());
}

#[test]
fn two_silos_a_grain_apart_trade_nothing() {
    // 4 MiB grains on 20 MiB silos: 3 against 2, a difference bigger than
    // the margin, whose excess over the mean is exactly half a grain.
    let grains_of = |keys: std::ops::Range<u64>| -> Vec<Candidate> {
        candidates(keys)
            .into_iter()
            .map(|candidate| Candidate {
                bytes: 4 * MIB,
                ..candidate
            })
            .collect()
    };
    let view = vec![
        member("a", vec![device(20, 12)]),
        member("b", vec![device(20, 8)]),
    ];
    // `a`, half a grain above the mean, keeps its grains (a move would put
    // `b` half a grain above it); `b` is below the mean anyway.
    assert_eq!(
        plan_for(&config(), "a", &view, &grains_of(0..3)),
        Plan::default()
    );
    assert_eq!(
        plan_for(&config(), "b", &view, &grains_of(10..12)),
        Plan::default()
    );
}

#[test]
fn grains_that_cannot_move_are_only_ever_shed() {
    let view = vec![
        member("a", vec![device(10, 10)]),
        member("c", vec![device(10, 0)]),
    ];
    // Nine grains of a type that may not move, idle long; one that may,
    // idle a little, so `c` is a target.
    let mut grains = candidates(0..10);
    for candidate in &mut grains[..9] {
        candidate.movable = false;
        candidate.idle_for = Duration::from_secs(500);
    }
    grains[9].idle_for = Duration::from_secs(1);
    let plan = plan_for(&config(), "a", &view, &grains);
    assert_eq!(plan.moves.len(), 1, "{plan:?}");
    assert_eq!(plan.moves[0].grain, grain(9));
    // 10 MiB down to 8: the move covers one, a shed the other.
    assert_eq!(plan.shed, vec![grain(0)], "{plan:?}");
}

#[test]
fn grains_past_the_rounds_moves_wait_for_the_next_round_rather_than_being_shed() {
    let config = RebalanceConfig {
        moves_per_round: 2,
        ..config()
    };
    // 25 MiB at 100%: 5 MiB over the fill limit, room at `c` for all.
    let view = vec![
        member("a", vec![device(25, 25)]),
        member("c", vec![device(25, 0)]),
    ];
    let mut grains = candidates(0..25);
    for candidate in &mut grains {
        candidate.idle_for = Duration::from_secs(500);
    }
    let plan = plan_for(&config, "a", &view, &grains);
    assert_eq!(plan.moves.len(), 2, "{plan:?}");
    assert!(plan.shed.is_empty(), "{plan:?}");
}

#[test]
fn past_high_water_grains_go_to_another_device_of_their_silo_first() {
    let config = RebalanceConfig {
        moves_per_round: 100,
        ..config()
    };
    // Device 0 at 95%, device 1 at 50%, device 2 at 40%; silo c empty.
    let view = vec![
        member("a", vec![device(20, 19), device(20, 10), device(20, 8)]),
        member("c", vec![device(40, 0)]),
    ];
    let grains = candidates(0..19);
    let plan = plan_for(&config, "a", &view, &grains);
    // 19 MiB down to 16 on device 0: three grains idle longest, to the
    // emptiest device here each time (2, then 1 and 2 level), none away.
    let moved: Vec<_> = plan
        .moves
        .iter()
        .map(|mv| (mv.grain.clone(), mv.to.clone(), mv.reason))
        .collect();
    let a = SiloId::new("a", 1);
    assert_eq!(
        moved,
        vec![
            (grain(0), Destination::Device(2), Reason::HighWater),
            (grain(1), Destination::Device(2), Reason::HighWater),
            (grain(2), Destination::Device(1), Reason::HighWater),
        ],
        "{plan:?}"
    );
    // Grains whose move between this silo's devices failed within the
    // cool-down go away instead.
    let refused: Vec<Candidate> = grains
        .iter()
        .map(|candidate| Candidate {
            local: false,
            ..candidate.clone()
        })
        .collect();
    let plan = plan_for(&config, "a", &view, &refused);
    assert_eq!(plan.moves.len(), 3, "{plan:?}");
    assert!(
        plan.moves.iter().all(|mv| mv.to.silo().is_some()),
        "{plan:?}"
    );
    // Only up to the fill limit (16 MiB) of a device here: with both at
    // 15 MiB, one grain fits on each, and the third goes away.
    let view = vec![
        member("a", vec![device(20, 19), device(20, 15), device(20, 15)]),
        member("c", vec![device(40, 0)]),
    ];
    let plan = plan_for(&config, "a", &view, &grains);
    let went: Vec<_> = plan.moves.iter().map(|mv| mv.to.clone()).collect();
    let c = Destination::Silo(SiloId::new("c", 1));
    assert_eq!(
        went,
        vec![Destination::Device(1), Destination::Device(2), c],
        "{plan:?}"
    );
    // A type that needs more compute units than the devices here have
    // moves none of its grains between them.
    let needs = HashMap::from([(
        "Tensor".to_string(),
        GpuNeeds {
            min_compute_units: 16,
            ..GpuNeeds::default()
        },
    )]);
    let plan = super::plan(
        &config,
        &Snapshot {
            me: &a,
            view: &view,
            grains: &grains,
            sent: &HashMap::new(),
            long_queue_rounds: 0,
            needs: &needs,
        },
    );
    assert!(
        !plan.moves.is_empty() && plan.moves.iter().all(|mv| mv.to.silo().is_some()),
        "{plan:?}"
    );
}

#[test]
fn a_long_queue_moves_the_busiest_grain_on_it_to_an_idle_like_device_of_the_same_silo_first() {
    let config = config();
    let mut busy = device(100, 50);
    busy.queue_depth = 64;
    let idle_here = device(100, 50);
    let mut weaker_here = device(100, 10);
    weaker_here.compute_units = 4;
    let view = vec![
        member(
            "a",
            vec![busy.clone(), weaker_here.clone(), idle_here.clone()],
        ),
        member("b", vec![device(100, 50)]),
    ];
    let mut grains = candidates(0..10);
    // The busiest grain (9, idle shortest) is on device 2; the busiest on
    // the busy device 0 is 8.
    grains[9].device = Some(2);
    // Silo b is as full as a: no spread.
    let me = SiloId::new("a", 1);
    let sent = HashMap::new();
    let needs = HashMap::new();
    let snapshot = Snapshot {
        me: &me,
        view: &view,
        grains: &grains,
        sent: &sent,
        long_queue_rounds: 3,
        needs: &needs,
    };
    assert_eq!(
        plan(&config, &snapshot).moves,
        vec![Move {
            grain: grain(8),
            to: Destination::Device(2),
            bytes: MIB,
            reason: Reason::Queue,
        }]
    );
    // With no like device idle here, the busiest grain goes away.
    let view = vec![
        member("a", vec![busy, weaker_here]),
        member("b", vec![device(100, 50)]),
    ];
    let snapshot = Snapshot {
        view: &view,
        ..snapshot
    };
    let moves = plan(&config, &snapshot).moves;
    assert_eq!(moves.len(), 1);
    assert_eq!(moves[0].to, Destination::Silo(SiloId::new("b", 1)));
}
