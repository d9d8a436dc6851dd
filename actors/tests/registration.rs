//! Registration without repetition: `#[derive(GrainType)]` and
//! `#[derive(Message)]` declare a grain type's name and the messages it
//! accepts by name once, and `SiloBuilder::host` registers it in one line.
//! The derived names are the ones that travel: `Silo::call_named` finds
//! the grain and its messages under them, and a reference on a routed
//! silo sends its messages under them. What only the whole silo can see
//! (a name taken twice, a type hosted twice) is refused by
//! `SiloBuilder::build`, as with the explicit form. What the derive can
//! check alone fails to compile: see the `compile_fail` examples on the
//! derives (`actors/macros/src/lib.rs`).

use std::sync::{Arc, Mutex, OnceLock};

use futures_util::future::BoxFuture;
use granary_actors::dispatch::{decode, encode};
use granary_actors::route::{Delivered, HomeSide, InboundRequest, Kind, Outbound, Router};
use granary_actors::{
    CallError, DispatchError, Grain, GrainContext, GrainKey, GrainType, Handler, MemoryStorage,
    Message, NamedMessage, REMINDER_FIRED, ReadHandler, Registration, ReminderFired, Silo,
    SiloError,
};
use serde::{Deserialize, Serialize};

/// A grain with a chosen name, two messages, a read and reminders.
#[derive(GrainType)]
#[grain(name = "ledger", messages(Apply, Notify), reads(Balance), remindable)]
struct Ledger {
    balance: i64,
    notes: Vec<String>,
}

impl Grain for Ledger {
    fn new(_: &GrainKey) -> Ledger {
        Ledger {
            balance: 0,
            notes: Vec::new(),
        }
    }
}

/// Adds to the balance; answers the new balance. Named explicitly.
#[derive(Debug, Message, Serialize, Deserialize)]
#[message(name = "apply", reply = i64)]
struct Apply(i64);
impl Handler<Apply> for Ledger {
    async fn handle(&mut self, Apply(n): Apply, _: &mut GrainContext) -> i64 {
        self.balance += n;
        self.balance
    }
}

/// Records a note; answers nothing. Named after its type.
#[derive(Debug, Message, Serialize, Deserialize)]
struct Notify(String);
impl Handler<Notify> for Ledger {
    async fn handle(&mut self, Notify(note): Notify, _: &mut GrainContext) {
        self.notes.push(note);
    }
}

/// The balance and the notes, as a read.
#[derive(Debug, Message, Serialize, Deserialize)]
#[message(reply = (i64, Vec<String>))]
struct Balance;
impl ReadHandler<Balance> for Ledger {
    async fn handle_read(&self, _: Balance, _: &GrainContext) -> (i64, Vec<String>) {
        (self.balance, self.notes.clone())
    }
}

impl Handler<ReminderFired> for Ledger {
    async fn handle(&mut self, fired: ReminderFired, _: &mut GrainContext) {
        self.notes.push(format!("reminder {}", fired.name));
    }
}

/// A stateless worker, named after its type. Its worker count is a
/// const of its own, checked when this compiles (as a literal is).
#[derive(GrainType)]
#[grain(stateless(max_workers = Self::WORKERS))]
struct Resizer;
impl Resizer {
    const WORKERS: usize = 2;
}
impl Grain for Resizer {
    fn new(_: &GrainKey) -> Resizer {
        Resizer
    }
}

/// A generic message: one name for every instantiation, so a grain takes
/// one of them by name. No bounds of its own: the derive bounds `T` by
/// `Send + 'static`, as `Message` needs.
#[derive(Message, Serialize, Deserialize)]
#[message(name = "echo", reply = T)]
struct Echo<T>(T);

/// Reaches the runtime through a path of its own (as the `granary`
/// facade's users do, with `crate = granary::actors`).
mod runtime {
    pub use granary_actors::*;
}

#[derive(GrainType)]
#[grain(crate = crate::runtime, name = "echoer", messages(Echo<u32>))]
struct Echoer;
impl Grain for Echoer {
    fn new(_: &GrainKey) -> Echoer {
        Echoer
    }
}
impl Handler<Echo<u32>> for Echoer {
    async fn handle(&mut self, Echo(n): Echo<u32>, _: &mut GrainContext) -> u32 {
        n
    }
}

fn ledger_silo() -> Silo {
    Silo::builder()
        .host::<Ledger>()
        .host::<Resizer>()
        .host::<Echoer>()
        .storage(Arc::new(MemoryStorage::new()))
        .build()
        .unwrap()
}

#[test]
fn derived_names_are_the_declared_ones_or_the_type_identifiers() {
    assert_eq!(Ledger::NAME, "ledger");
    assert_eq!(Resizer::NAME, "Resizer");
    assert_eq!(Resizer::STATELESS, Some(2));
    assert_eq!(Ledger::STATELESS, None);
    assert_eq!(Apply::NAME, "apply");
    assert_eq!(Notify::NAME, "Notify");
    assert_eq!(Balance::NAME, "Balance");
    assert_eq!(<Echo<u32>>::NAME, "echo");
    assert_eq!(<ReminderFired as NamedMessage>::NAME, REMINDER_FIRED);
}

#[tokio::test]
async fn host_registers_the_type_its_messages_reads_and_reminders_under_derived_names() {
    let silo = ledger_silo();
    assert_eq!(silo.grain_type_name::<Ledger>(), Some(Ledger::NAME));
    assert_eq!(silo.grain_type_name::<Resizer>(), Some(Resizer::NAME));
    assert_eq!(silo.message_name::<Ledger, Apply>(), Some(Apply::NAME));
    assert_eq!(silo.message_name::<Ledger, Notify>(), Some(Notify::NAME));
    assert_eq!(
        silo.message_name::<Ledger, ReminderFired>(),
        Some(REMINDER_FIRED)
    );
    assert_eq!(silo.message_name::<Echoer, Echo<u32>>(), Some("echo"));
    // The stateless worker is hosted, but never routed (rule 12).
    assert_eq!(silo.routed_grain_types(), vec!["echoer", "ledger"]);
    // The names a cluster checks a request against.
    assert!(
        silo.check_named(Ledger::NAME, Apply::NAME, Kind::Call)
            .is_ok()
    );
    assert!(
        silo.check_named(Ledger::NAME, Notify::NAME, Kind::Tell)
            .is_ok()
    );
    assert!(
        silo.check_named(Ledger::NAME, Balance::NAME, Kind::Read)
            .is_ok()
    );
    assert!(
        silo.check_named(Ledger::NAME, Balance::NAME, Kind::Call)
            .is_err(),
        "a read is named as a read only"
    );
    silo.shutdown().await;
}

#[tokio::test]
async fn named_calls_find_the_grain_and_its_messages_under_derived_names() {
    let silo = ledger_silo();
    let key = GrainKey::from("alice");
    let reply = silo
        .call_named(
            Ledger::NAME,
            key.clone(),
            Apply::NAME,
            &encode(&Apply(7)).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(decode::<i64>(&reply).unwrap(), 7);
    silo.tell_named(
        Ledger::NAME,
        key.clone(),
        Notify::NAME,
        &encode(&Notify("told".into())).unwrap(),
    )
    .await
    .unwrap();
    // The tell is admitted; the read after it on the typed path sees it.
    let (balance, notes) = silo.grain::<Ledger>(key).read(Balance).await.unwrap();
    assert_eq!(balance, 7);
    assert_eq!(notes, vec!["told".to_string()]);
    // The explicit names of the old form are not there.
    let old = silo
        .call_named("Ledger", GrainKey::from("bob"), "apply", &[])
        .await;
    assert!(
        matches!(old, Err(DispatchError::UnknownGrainType(_))),
        "{old:?}"
    );
    // Through the generic message, under the runtime's other path.
    let reply = silo
        .call_named(
            Echoer::NAME,
            GrainKey::from(1u64),
            "echo",
            &encode(&Echo(41u32)).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(decode::<u32>(&reply).unwrap(), 41);
    silo.shutdown().await;
}

#[tokio::test]
async fn host_and_the_explicit_form_register_the_same_names() {
    let hosted = ledger_silo();
    let explicit = Silo::builder()
        .register::<Ledger>("ledger")
        .message::<Ledger, Apply>("apply")
        .message::<Ledger, Notify>("Notify")
        .read_message::<Ledger, Balance>("Balance")
        .remindable::<Ledger>()
        .register_stateless::<Resizer>("Resizer", 2)
        .register::<Echoer>("echoer")
        .message::<Echoer, Echo<u32>>("echo")
        .build()
        .unwrap();
    assert_eq!(hosted.routed_grain_types(), explicit.routed_grain_types());
    for silo in [&hosted, &explicit] {
        assert_eq!(silo.grain_type_name::<Ledger>(), Some("ledger"));
        assert_eq!(silo.grain_type_name::<Resizer>(), Some("Resizer"));
        assert_eq!(silo.message_name::<Ledger, Apply>(), Some("apply"));
        assert_eq!(silo.message_name::<Ledger, Notify>(), Some("Notify"));
        assert!(silo.check_named("ledger", "Balance", Kind::Read).is_ok());
    }
    hosted.shutdown().await;
    explicit.shutdown().await;
}

#[test]
fn a_type_hosted_twice_is_refused_at_build() {
    let twice = Silo::builder()
        .host::<Ledger>()
        .host::<Ledger>()
        .storage(Arc::new(MemoryStorage::new()))
        .build();
    assert!(
        matches!(&twice, Err(SiloError::DuplicateName(name)) if name == "ledger"),
        "{twice:?}"
    );
    // Hosted, then registered explicitly under another name.
    let both = Silo::builder()
        .host::<Resizer>()
        .register::<Resizer>("resizer")
        .build();
    assert!(matches!(both, Err(SiloError::InvalidConfig(_))), "{both:?}");
}

/// Another grain type that claims the ledger's name.
#[derive(GrainType)]
#[grain(name = "ledger")]
struct Impostor;
impl Grain for Impostor {
    fn new(_: &GrainKey) -> Impostor {
        Impostor
    }
}

#[test]
fn two_grain_types_under_one_name_are_refused_at_build() {
    let clash = Silo::builder()
        .host::<Ledger>()
        .host::<Impostor>()
        .storage(Arc::new(MemoryStorage::new()))
        .build();
    assert!(
        matches!(&clash, Err(SiloError::DuplicateName(name)) if name == "ledger"),
        "{clash:?}"
    );
}

/// A worker count written by hand (the derive refuses 0 when it
/// compiles, as a literal or a const): checked by `build`.
struct Idle;
impl Grain for Idle {
    fn new(_: &GrainKey) -> Idle {
        Idle
    }
}
impl GrainType for Idle {
    const NAME: &'static str = "Idle";
    const STATELESS: Option<usize> = Some(0);
    fn accepts(registration: Registration<Idle>) -> Registration<Idle> {
        registration
    }
}

#[test]
fn a_stateless_worker_without_workers_is_refused_at_build() {
    let idle = Silo::builder().host::<Idle>().build();
    assert!(
        matches!(&idle, Err(SiloError::InvalidConfig(why)) if why.contains("max_workers is 0")),
        "{idle:?}"
    );
}

/// A name registered by hand is held to the rules the derive applies: not
/// one the runtime keeps for its services and records (a remote request
/// for `$observers` would reach the cluster's observer service, not the
/// grain), nor longer than the directory takes.
#[test]
fn a_grain_type_name_the_runtime_keeps_is_refused_at_build() {
    for name in [
        "",
        "$observers",
        "$health",
        "granary.reminders",
        &"g".repeat(granary_actors::MAX_GRAIN_TYPE_NAME + 1),
    ] {
        let built = Silo::builder().register::<Idle>(name).build();
        assert!(
            matches!(&built, Err(SiloError::InvalidConfig(why))
                if why.contains("grain type name")),
            "{name:?}: {built:?}"
        );
        assert!(granary_actors::grain_type_name_error(name).is_some());
    }
    let longest = "g".repeat(granary_actors::MAX_GRAIN_TYPE_NAME);
    assert!(granary_actors::grain_type_name_error(&longest).is_none());
    assert!(granary_actors::grain_type_name_error("ledger.v2").is_none());
}

/// Written by hand (as for a generic grain), registering two messages
/// under one name: the derive refuses this when the crate compiles; by
/// hand it is refused at build.
struct Handmade;
impl Grain for Handmade {
    fn new(_: &GrainKey) -> Handmade {
        Handmade
    }
}
#[derive(Message, Serialize, Deserialize)]
#[message(name = "same")]
struct First;
#[derive(Message, Serialize, Deserialize)]
#[message(name = "same")]
struct Second;
impl Handler<First> for Handmade {
    async fn handle(&mut self, _: First, _: &mut GrainContext) {}
}
impl Handler<Second> for Handmade {
    async fn handle(&mut self, _: Second, _: &mut GrainContext) {}
}
impl GrainType for Handmade {
    const NAME: &'static str = "handmade";
    fn accepts(registration: Registration<Self>) -> Registration<Self> {
        registration.message::<First>().message::<Second>()
    }
}

#[test]
fn two_messages_under_one_name_are_refused_at_build() {
    let clash = Silo::builder().host::<Handmade>().build();
    assert_eq!(
        clash.err(),
        Some(SiloError::DuplicateMessage {
            grain_type: "handmade".into(),
            message: "same".into(),
        })
    );
}

#[test]
fn a_remindable_grain_outside_a_runtime_is_refused_at_build() {
    // Built outside a runtime: refused at build, not at the first reminder.
    let outside = Silo::builder().host::<Ledger>().build();
    assert!(
        matches!(&outside, Err(SiloError::InvalidConfig(why)) if why.contains("tokio runtime")),
        "{outside:?}"
    );
}

/// What a routed silo's references sent, by name.
#[derive(Default)]
struct Sent(Mutex<Vec<(String, String, Kind)>>);

/// Sends every message to the other silo's home side, by name, and
/// records the names; the home silo's router delivers everything there.
struct Away {
    sent: Arc<Sent>,
    home: Arc<OnceLock<HomeSide>>,
}

impl Router for Away {
    fn dispatch(&self, message: Box<dyn Outbound>) -> BoxFuture<'_, Result<Delivered, CallError>> {
        Box::pin(async move {
            let grain = message.grain().clone();
            let name = message.message_name()?.to_string();
            self.sent.0.lock().unwrap().push((
                grain.type_name.clone(),
                name.clone(),
                message.kind(),
            ));
            let payload = message.encode()?;
            let home = self.home.get().expect("the test routes after setup");
            let reply = home
                .dispatch(InboundRequest {
                    grain_type: &grain.type_name,
                    key: grain.key.clone(),
                    message: &name,
                    payload: &payload,
                    kind: message.kind(),
                    chain: message.chain(),
                    time_left: message
                        .deadline()
                        .saturating_duration_since(tokio::time::Instant::now()),
                })
                .await
                .map_err(|err| CallError::Unavailable {
                    grain: grain.clone(),
                    reason: err.to_string(),
                })?;
            Ok(Delivered::Elsewhere(reply))
        })
    }
}

/// The home silo's router: everything lives here.
struct Here;

impl Router for Here {
    fn dispatch(&self, message: Box<dyn Outbound>) -> BoxFuture<'_, Result<Delivered, CallError>> {
        Box::pin(async move {
            message.deliver_here(None).await?;
            Ok(Delivered::Here)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_on_a_routed_silo_sends_the_derived_names() {
    let storage = Arc::new(MemoryStorage::new());
    let build = || {
        Silo::builder()
            .host::<Ledger>()
            .storage(storage.clone())
            .build()
            .unwrap()
    };
    let (sender, home) = (build(), build());
    let sent = Arc::new(Sent::default());
    let home_side = Arc::new(OnceLock::new());
    assert!(
        home_side
            .set(home.route_through(Arc::new(Here)).unwrap())
            .is_ok()
    );
    sender
        .route_through(Arc::new(Away {
            sent: sent.clone(),
            home: home_side,
        }))
        .unwrap();

    let ledger = sender.grain::<Ledger>("carol");
    assert_eq!(ledger.call(Apply(3)).await.unwrap(), 3);
    ledger.tell(Notify("remote".into())).await.unwrap();
    let (balance, notes) = ledger.read(Balance).await.unwrap();
    assert_eq!((balance, notes), (3, vec!["remote".to_string()]));
    assert_eq!(
        *sent.0.lock().unwrap(),
        vec![
            ("ledger".to_string(), "apply".to_string(), Kind::Call),
            ("ledger".to_string(), "Notify".to_string(), Kind::Tell),
            ("ledger".to_string(), "Balance".to_string(), Kind::Read),
        ]
    );
    // The grain lives at the home silo only.
    assert!(home.grain::<Ledger>("carol").is_active());
    assert!(!sender.grain::<Ledger>("carol").is_active());
    sender.shutdown().await;
    home.shutdown().await;
}

/// A mailbox capacity outside 1..=u32::MAX (the mailbox counts its slots in
/// a `u32`) is refused at build, with the bound.
#[cfg(target_pointer_width = "64")]
#[test]
fn a_mailbox_capacity_outside_its_bounds_is_refused_at_build() {
    for capacity in [0, u32::MAX as usize + 1, usize::MAX] {
        let config = granary_actors::SiloConfig {
            mailbox_capacity: capacity,
            ..granary_actors::SiloConfig::default()
        };
        let built = Silo::builder().config(config).build();
        assert!(
            matches!(&built, Err(SiloError::InvalidConfig(why))
                if why.contains("mailbox_capacity is")
                    && (capacity == 0 || why.contains(&u32::MAX.to_string()))),
            "{capacity}: {built:?}"
        );
    }
    let config = granary_actors::SiloConfig {
        mailbox_capacity: u32::MAX as usize,
        ..granary_actors::SiloConfig::default()
    };
    assert!(Silo::builder().config(config).build().is_ok());
}
