//! An actix-web service that embeds a Granary silo.
//!
//! `POST /double/{key}` with a JSON array of numbers asks the grain `key` of
//! type `Doubler` to double them; the grain sends the work through the
//! silo's GPU bridge (the CPU backend here, a device where one is present).
//! `GET /stats/{key}` answers how many requests that grain has served.
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
};
use granary_gpu::{ExecuteError, GpuBridge};
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

fn call_failed(err: CallError) -> HttpResponse {
    HttpResponse::ServiceUnavailable().body(err.to_string())
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
    let grain = state.silo.grain::<Doubler>(key.into_inner());
    let reply = state
        .runtime
        .spawn(async move { grain.call(Double(values)).await })
        .await;
    match reply {
        Ok(Ok(Ok(doubled))) => HttpResponse::Ok()
            .content_type("application/json")
            .body(serde_json::to_string(&doubled).unwrap_or_default()),
        Ok(Ok(Err(err))) => HttpResponse::UnprocessableEntity().body(err.to_string()),
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
    let bridge = GpuBridge::builder()
        .kernels(shipped::ALL)
        .build()
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let silo = Silo::builder()
        .host::<Doubler>()
        .service(Arc::new(bridge))
        .build()
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let state = web::Data::new(State {
        silo: silo.clone(),
        runtime: runtime.handle().clone(),
    });

    println!("listening on http://{bound}");
    let served = actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .route("/double/{key}", web::post().to(double))
                .route("/stats/{key}", web::get().to(stats))
        })
        .workers(2)
        .listen(listener)?
        .run()
        .await
    });
    runtime.block_on(silo.shutdown());
    served
}
