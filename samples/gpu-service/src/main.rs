//! An actix-web service that embeds a Granary silo.
//!
//! `POST /double/{key}` with a JSON array of numbers asks the grain `key` of
//! type `Doubler` to double them; the grain sends the work through the
//! silo's GPU bridge (the CPU backend here, a device where one is present).
//! `GET /stats/{key}` answers how many requests that grain has served
//! since it was activated: the count is not persisted, so a grain
//! deactivated (idle for the silo's `idle_timeout`, 15 minutes, or sooner
//! while more than 100 000 grains are live) counts from 0 again.
//!
//! Statuses: 400 for a body that is not a JSON array of finite `f32`s, 413
//! for more than the kernel takes, 422 for input the kernel refuses or a
//! result past `f32`'s range, 503 (with `Retry-After`) while the GPU or the
//! silo is overloaded, recovering or shutting down, 504 for a grain that
//! did not answer in time, 500 for a failure on the server's side, whose
//! details go to the service's log, not to the client.
//!
//! Ctrl-C or SIGTERM stops it gracefully: no new connections, the
//! requests in flight answered (up to 30 s), then the silo's grains
//! deactivated and the GPU bridge drained. A second signal stops it at
//! once (exit status 130).
//!
//! The silo runs on a tokio runtime of its own: actix-web runs each worker
//! on a single-threaded runtime of its own, and grains must outlive any one
//! of them. Handlers reach the silo through that runtime's handle.
//!
//! ```text
//! cargo run -p gpu-service -- 127.0.0.1:8080
//! curl -d '[1, 2.5]' http://127.0.0.1:8080/double/alice
//! ```

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, web};
use granary_actors::{
    ActivationError, CallError, Grain, GrainContext, GrainKey, GrainType, Handler, Message, Silo,
    SiloConfig,
};
use granary_gpu::{ExecuteError, GpuBridge};
use granary_kernels::StopMode;
use granary_kernels::shipped::{self, bytes_f32, f32_bytes};

/// Doubles vectors on the silo's GPU bridge and counts its requests.
/// Hosted as `"doubler"`; its messages come from this process only, so
/// it accepts none by name from other silos.
#[derive(GrainType)]
#[grain(name = "doubler")]
struct Doubler {
    bridge: Option<Arc<GpuBridge>>,
    served: u64,
}

impl Grain for Doubler {
    fn new(_: &GrainKey) -> Doubler {
        Doubler {
            bridge: None,
            served: 0,
        }
    }

    async fn on_activate(&mut self, ctx: &mut GrainContext) -> Result<(), ActivationError> {
        self.bridge = Some(
            ctx.service::<GpuBridge>()
                .ok_or_else(|| ActivationError("no GPU bridge on this silo".into()))?,
        );
        Ok(())
    }
}

#[derive(Message)]
#[message(reply = Result<Vec<f32>, ExecuteError>)]
struct Double(Vec<f32>);
impl Handler<Double> for Doubler {
    async fn handle(
        &mut self,
        Double(values): Double,
        _: &mut GrainContext,
    ) -> Result<Vec<f32>, ExecuteError> {
        let bridge = self.bridge.as_ref().ok_or(ExecuteError::ShutDown)?;
        let output = bridge.execute("double", &f32_bytes(&values)).await?;
        self.served += 1;
        Ok(bytes_f32(&output))
    }
}

#[derive(Message)]
#[message(reply = u64)]
struct Served;
impl Handler<Served> for Doubler {
    async fn handle(&mut self, _: Served, _: &mut GrainContext) -> u64 {
        self.served
    }
}

/// What every HTTP worker shares.
struct State {
    silo: Silo,
    runtime: tokio::runtime::Handle,
}

/// 503 with `Retry-After`: busy or stopping, worth a retry in a second.
fn retry_later(why: String) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .insert_header(("Retry-After", "1"))
        .body(why)
}

/// A grain call that failed, as a status: busy or stopping (503, worth a
/// retry), no answer in time (504), or the server's own failure (500, its
/// details in the log).
fn call_failed(err: CallError) -> HttpResponse {
    match err {
        CallError::Overloaded { .. } | CallError::ShutDown | CallError::Unavailable { .. } => {
            retry_later(err.to_string())
        }
        CallError::Timeout { .. } => HttpResponse::GatewayTimeout().body(err.to_string()),
        err => {
            eprintln!("gpu-service: a grain call failed: {err}");
            HttpResponse::InternalServerError().body("the grain call failed; see the service's log")
        }
    }
}

/// The bridge's answer to a request, as a status a client can act on: its
/// own mistakes (4xx) with the reason, a busy or stopping service (503) to
/// retry, and the server's failures (500) without their details, which may
/// hold a device compiler's log.
fn bridge_failed(err: ExecuteError) -> HttpResponse {
    match err {
        ExecuteError::TooLarge { .. } => HttpResponse::PayloadTooLarge().body(err.to_string()),
        ExecuteError::WrongShape { .. } | ExecuteError::Rejected { .. } => {
            HttpResponse::UnprocessableEntity().body(err.to_string())
        }
        // Busy, or a hung kernel being relaunched, or no device now.
        ExecuteError::Overloaded { .. }
        | ExecuteError::ShutDown
        | ExecuteError::DeviceHung { .. }
        | ExecuteError::NoDevice { .. } => retry_later(err.to_string()),
        err => {
            eprintln!("gpu-service: the GPU bridge failed: {err}");
            HttpResponse::InternalServerError().body("the GPU bridge failed; see the service's log")
        }
    }
}

async fn double(state: web::Data<State>, key: web::Path<String>, body: web::Bytes) -> HttpResponse {
    // Bad input gets a clear 400, never a panic.
    let values: Vec<f32> = match serde_json::from_slice(&body) {
        Ok(values) => values,
        Err(err) => {
            return HttpResponse::BadRequest()
                .body(format!("expected a JSON array of numbers: {err}"));
        }
    };
    // A number past f32's range reads as an infinity, which JSON cannot
    // carry back.
    if let Some(at) = values.iter().position(|value| !value.is_finite()) {
        return HttpResponse::BadRequest()
            .body(format!("number {at} is outside the range of an f32"));
    }
    let grain = state.silo.grain::<Doubler>(key.into_inner());
    let reply = state
        .runtime
        .spawn(async move { grain.call(Double(values)).await })
        .await;
    match reply {
        // Doubled past f32's range: JSON would write `null`, a made-up
        // answer.
        Ok(Ok(Ok(doubled))) if doubled.iter().any(|value| !value.is_finite()) => {
            HttpResponse::UnprocessableEntity().body("the result is outside the range of an f32")
        }
        Ok(Ok(Ok(doubled))) => match serde_json::to_string(&doubled) {
            Ok(json) => HttpResponse::Ok()
                .content_type("application/json")
                .body(json),
            Err(err) => HttpResponse::InternalServerError().body(err.to_string()),
        },
        Ok(Ok(Err(err))) => bridge_failed(err),
        Ok(Err(err)) => call_failed(err),
        Err(err) => HttpResponse::InternalServerError().body(err.to_string()),
    }
}

async fn stats(state: web::Data<State>, key: web::Path<String>) -> HttpResponse {
    let grain = state.silo.grain::<Doubler>(key.into_inner());
    match state
        .runtime
        .spawn(async move { grain.call(Served).await })
        .await
    {
        Ok(Ok(served)) => HttpResponse::Ok().body(served.to_string()),
        Ok(Err(err)) => call_failed(err),
        Err(err) => HttpResponse::InternalServerError().body(err.to_string()),
    }
}

fn main() -> std::io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = TcpListener::bind(&address)?;
    let bound = listener.local_addr()?;

    // The silo's own runtime, and the silo with its GPU bridge.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let bridge = Arc::new(
        GpuBridge::builder()
            .kernels(shipped::ALL)
            .build()
            .map_err(|err| std::io::Error::other(err.to_string()))?,
    );
    // Each key a client names is a grain: without limits, a client that
    // names a million keys keeps a million activations for the idle
    // timeout. Idle ones are shed past 100 000; past 200 000 a call that
    // would start one more is refused (503) while the others serve on.
    let config = SiloConfig {
        max_activations: Some(100_000),
        activation_limit: Some(200_000),
        ..SiloConfig::default()
    };
    let silo = Silo::builder()
        .config(config)
        .host::<Doubler>()
        .service(bridge.clone())
        .build()
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let state = web::Data::new(State {
        silo: silo.clone(),
        runtime: runtime.handle().clone(),
    });

    // Signals are listened for before the service says it listens: the
    // first stops it gracefully (below), a second at once.
    let mut signals = {
        let _context = runtime.enter();
        StopSignals::listen()?
    };
    let (stop, stopping) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(async move {
        signals.next().await;
        // A server that already ended (it could not listen, say) has
        // nothing to stop gracefully: the first signal is the last.
        if stop.send(()).is_ok() {
            signals.next().await;
        }
        say(format_args!("stopping at once"));
        std::process::exit(130);
    });
    say(format_args!("listening on http://{bound}"));
    let served = actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .route("/double/{key}", web::post().to(double))
                .route("/stats/{key}", web::get().to(stats))
        })
        .workers(2)
        // Ctrl-C and SIGTERM both stop gracefully, here: actix's own
        // handling stops at once on Ctrl-C, cutting requests in flight.
        .disable_signals()
        .shutdown_timeout(30)
        .listen(listener)?
        .run();
        let handle = server.handle();
        actix_web::rt::spawn(async move {
            if stopping.await.is_ok() {
                say(format_args!(
                    "stopping: no new connections; requests in flight finish"
                ));
                handle.stop(true).await;
            }
        });
        server.await
    });
    // Then the grains (each finishing its turn and running
    // `on_deactivate`), then the bridge, once the requests it holds are
    // answered.
    runtime.block_on(async {
        silo.shutdown().await;
        bridge.shutdown(StopMode::Drain).await;
    });
    say(format_args!("stopped: the silo and the GPU bridge drained"));
    served
}

/// A line on standard output; a closed output (a supervisor that stopped
/// reading) is not a reason to fail a shutdown.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// SIGTERM and Ctrl-C (SIGINT), listened for from when they are made.
struct StopSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Listens for both, inside a tokio runtime.
    fn listen() -> std::io::Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// The next of either; never, if Ctrl-C cannot be listened for.
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
