//! Named messages (`granary_actors::Silo::call_named`, what a remote
//! silo's request becomes): arbitrary payloads for a registered grain's
//! messages, and arbitrary names. Each call answers with a reply or a
//! typed error; the silo keeps serving afterwards.
#![no_main]

use std::sync::OnceLock;

use granary_actors::{Grain, GrainContext, GrainKey, Handler, Message, Silo};
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

struct Account {
    balance: i64,
    history: Vec<String>,
}

impl Grain for Account {
    fn new(_: &GrainKey) -> Account {
        Account {
            balance: 0,
            history: Vec::new(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Deposit {
    amount: i64,
    memo: String,
}

impl Message for Deposit {
    type Reply = Result<i64, String>;
}

impl Handler<Deposit> for Account {
    async fn handle(&mut self, deposit: Deposit, _: &mut GrainContext) -> Result<i64, String> {
        self.balance = self
            .balance
            .checked_add(deposit.amount)
            .ok_or_else(|| "overflow".to_string())?;
        self.history.push(deposit.memo);
        self.history.truncate(16);
        Ok(self.balance)
    }
}

#[derive(Serialize, Deserialize)]
struct Rename(Vec<(u32, Option<String>)>);

impl Message for Rename {
    type Reply = usize;
}

impl Handler<Rename> for Account {
    async fn handle(&mut self, Rename(names): Rename, _: &mut GrainContext) -> usize {
        names.len()
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    })
}

fn silo() -> &'static Silo {
    static SILO: OnceLock<Silo> = OnceLock::new();
    SILO.get_or_init(|| {
        let _in_runtime = runtime().enter();
        Silo::builder()
            .register::<Account>("account")
            .message::<Account, Deposit>("deposit")
            .message::<Account, Rename>("rename")
            .build()
            .expect("a silo")
    })
}

const TYPES: [&str; 3] = ["account", "nothing", ""];
const MESSAGES: [&str; 4] = ["deposit", "rename", "other", ""];

fuzz_target!(|data: &[u8]| {
    let [grain, message, key, payload @ ..] = data else {
        return;
    };
    let grain_type = TYPES[usize::from(*grain) % TYPES.len()];
    let message = MESSAGES[usize::from(*message) % MESSAGES.len()];
    let silo = silo();
    runtime().block_on(async {
        let _ = silo
            .call_named(
                grain_type,
                GrainKey::U64(u64::from(*key % 8)),
                message,
                payload,
            )
            .await;
        // Whatever came before, the silo still answers a good call.
        let good = granary_actors::dispatch::encode(&Deposit {
            amount: 0,
            memo: String::new(),
        })
        .expect("encodes");
        silo.call_named("account", GrainKey::U64(99), "deposit", &good)
            .await
            .expect("the silo keeps serving");
    });
});
