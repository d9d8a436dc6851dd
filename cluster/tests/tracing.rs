//! Trace context across silos (`granary_actors::trace`): a request from a
//! client to a grain on one silo, which calls a grain on a third (a
//! placement by grain type makes each hop cross silos), shows
//! one `trace` on every span and event it caused, on every silo, and
//! another request shows another. Recorded by a capturing subscriber.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitchat::transport::ChannelTransport;
use granary_actors::storage::MemoryStorage;
use granary_actors::{Grain, GrainContext, GrainKey, GrainType, Handler, Message, Silo, TraceId};
use granary_cluster::{
    ClusterNode, ClusterSecret, InProcessNetwork, Member, NodeConfig, PlacementError,
    PlacementRequest, PlacementStrategy, SiloId,
};
use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// The first hop: hosted on silo B only.
#[derive(GrainType)]
#[grain(name = "relay", messages(Relay))]
struct Relayer;

impl Grain for Relayer {
    fn new(_: &GrainKey) -> Relayer {
        Relayer
    }
}

#[derive(Serialize, Deserialize, Message)]
#[message(name = "relay", reply = Result<(String, String), String>)]
struct Relay(u64);

impl Handler<Relay> for Relayer {
    async fn handle(
        &mut self,
        Relay(key): Relay,
        ctx: &mut GrainContext,
    ) -> Result<(String, String), String> {
        let here = TraceId::current().map(|trace| trace.to_string());
        tracing::info!("relaying");
        let there = ctx
            .grain::<Leaf>(key)
            .call(Touch)
            .await
            .map_err(|err| err.to_string())?;
        Ok((here.unwrap_or_default(), there))
    }
}

/// The second hop: hosted on silo C only.
#[derive(GrainType)]
#[grain(name = "leaf", messages(Touch))]
struct Leaf;

impl Grain for Leaf {
    fn new(_: &GrainKey) -> Leaf {
        Leaf
    }
}

#[derive(Serialize, Deserialize, Message)]
#[message(name = "touch", reply = String)]
struct Touch;

impl Handler<Touch> for Leaf {
    async fn handle(&mut self, _: Touch, _: &mut GrainContext) -> String {
        tracing::info!("touched");
        TraceId::current()
            .map(|trace| trace.to_string())
            .unwrap_or_default()
    }
}

/// What the capturing subscriber saw: each `granary.*` span's name and
/// fields, and each event's message with the `trace` of its innermost
/// span that has one.
#[derive(Default)]
struct Seen {
    spans: Vec<(String, HashMap<String, String>)>,
    events: Vec<(String, Option<String>)>,
}

#[derive(Default)]
struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

struct Capture(Arc<Mutex<Seen>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields.0.clone());
        }
        if attrs.metadata().name().starts_with("granary.") {
            let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
            seen.spans
                .push((attrs.metadata().name().to_string(), fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(message) = fields.0.get("message").cloned() else {
            return;
        };
        let trace = ctx.event_scope(event).and_then(|scope| {
            scope.into_iter().find_map(|span| {
                span.extensions()
                    .get::<HashMap<String, String>>()
                    .and_then(|fields| fields.get("trace").cloned())
            })
        });
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.events.push((message, trace));
    }
}

/// Relays on silo 1, leaves on silo 2: each hop crosses silos.
struct ByType;

impl PlacementStrategy for ByType {
    fn place(
        &self,
        request: &PlacementRequest<'_>,
        members: &[Member],
    ) -> Result<SiloId, PlacementError> {
        let wanted = if request.grain.type_name == "leaf" {
            "silo-2:7000"
        } else {
            "silo-1:7000"
        };
        members
            .iter()
            .find(|member| member.silo.address == wanted)
            .map(|member| member.silo.clone())
            .ok_or(PlacementError::NoSilos)
    }
}

fn secret() -> ClusterSecret {
    ClusterSecret::new([0x92; 32]).expect("a 32-byte secret")
}

async fn start(
    n: u16,
    ports: &[u16],
    silo: Silo,
    client: bool,
    network: &InProcessNetwork,
    transport: &ChannelTransport,
) -> ClusterNode {
    let gossip = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let config = NodeConfig::new(
        "tracing",
        secret(),
        format!("silo-{n}:7000"),
        gossip(ports[usize::from(n)]),
        vec![gossip(ports[0]).to_string()],
    );
    let wire = Arc::new(network.transport(&config.listen));
    let mut builder = ClusterNode::builder(silo, config)
        .transport(wire)
        .placement(Arc::new(ByType));
    if client {
        builder = builder.client();
    }
    builder
        .start(transport.clone())
        .await
        .expect("the node starts on the in-process network")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_carries_one_trace_across_three_silos() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(Capture(seen.clone())),
    )
    .expect("the only subscriber of this test binary");

    let network = InProcessNetwork::new();
    let transport = ChannelTransport::default();
    let ports: Vec<u16> = (0..3)
        .map(|_| {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|socket| socket.local_addr())
                .map(|address| address.port())
                .expect("a free port")
        })
        .collect();
    let silo = || {
        Silo::builder()
            .host::<Relayer>()
            .host::<Leaf>()
            .storage(Arc::new(MemoryStorage::new()))
            .build()
            .expect("a silo hosting both grain types")
    };
    let a = start(0, &ports, silo(), true, &network, &transport).await;
    let b = start(1, &ports, silo(), false, &network, &transport).await;
    let c = start(2, &ports, silo(), false, &network, &transport).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while [&a, &b, &c].iter().any(|node| {
        node.members()
            .iter()
            .filter(|member| !member.load.grain_types.is_empty())
            .count()
            < 2
    }) {
        assert!(Instant::now() < deadline, "the views never converged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut traces = Vec::new();
    for key in [1, 2] {
        let (at_relay, at_leaf) = a
            .grain::<Relayer>(key)
            .call(Relay(key))
            .await
            .expect("the call crosses the cluster")
            .expect("the relay answers");
        assert_eq!(at_relay.len(), 16, "a trace id: {at_relay:?}");
        assert_eq!(at_relay, at_leaf, "the leaf's turn joins the relay's trace");
        traces.push(at_relay);
    }
    assert_ne!(traces[0], traces[1], "two requests, two traces");

    check(&seen.lock().unwrap_or_else(|e| e.into_inner()), &traces);
    for node in [a, b, c] {
        node.leave().await.expect("leaves");
    }
}

/// Every span and event of each trace, on every silo (module docs).
fn check(seen: &Seen, traces: &[String]) {
    for trace in traces {
        let spans = |name: &str, grain_type: &str| -> usize {
            seen.spans
                .iter()
                .filter(|(span, fields)| {
                    span == name
                        && fields.get("trace") == Some(trace)
                        && fields
                            .get("grain_type")
                            .or_else(|| fields.get("grain"))
                            .is_some_and(|value| value.contains(grain_type))
                })
                .count()
        };
        // Client A → relay on B: the call on A, the request on B, the turn.
        assert!(spans("granary.remote_call", "relay") >= 1, "{trace}");
        assert!(spans("granary.remote_request", "relay") >= 1, "{trace}");
        assert!(spans("granary.turn", "relay") >= 1, "{trace}");
        // B → leaf on C, in the same trace.
        assert!(spans("granary.remote_call", "leaf") >= 1, "{trace}");
        assert!(spans("granary.remote_request", "leaf") >= 1, "{trace}");
        assert!(spans("granary.turn", "leaf") >= 1, "{trace}");
        // The handlers' log lines fall under the trace.
        for message in ["relaying", "touched"] {
            assert!(
                seen.events
                    .iter()
                    .any(|(event, at)| event == message && at.as_ref() == Some(trace)),
                "no {message:?} event under trace {trace}"
            );
        }
    }
}
