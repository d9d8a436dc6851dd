//! Messages addressed by name, as another silo sends them: the wire form,
//! dispatch to the right grain and handler, and every misuse as a typed
//! error while the silo keeps serving.

use granary_actors::dispatch::{decode, encode};
use granary_actors::{
    CallError, DispatchError, Grain, GrainContext, GrainKey, Handler, Message, Silo, SiloError,
};
use serde::{Deserialize, Serialize};

struct Account {
    balance: i64,
}

impl Grain for Account {
    fn new(_: &GrainKey) -> Account {
        Account { balance: 0 }
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
        if deposit.amount <= 0 {
            return Err(format!("{}: not a deposit", deposit.memo));
        }
        self.balance += deposit.amount;
        Ok(self.balance)
    }
}

#[derive(Serialize, Deserialize)]
struct Balance;
impl Message for Balance {
    type Reply = i64;
}
impl Handler<Balance> for Account {
    async fn handle(&mut self, _: Balance, _: &mut GrainContext) -> i64 {
        self.balance
    }
}

/// A message the silo does not take by name.
#[derive(Serialize, Deserialize)]
struct Close;
impl Message for Close {
    type Reply = ();
}
impl Handler<Close> for Account {
    async fn handle(&mut self, _: Close, _: &mut GrainContext) {}
}

fn silo() -> Silo {
    Silo::builder()
        .register::<Account>("account")
        .message::<Account, Deposit>("deposit")
        .message::<Account, Balance>("balance")
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_message_by_name_reaches_the_grain_and_its_reply_comes_back() {
    let silo = silo();
    assert_eq!(silo.grain_type_name::<Account>(), Some("account"));
    assert_eq!(silo.message_name::<Account, Deposit>(), Some("deposit"));
    assert_eq!(silo.message_name::<Account, Close>(), None);
    let deposit = encode(&Deposit {
        amount: 40,
        memo: "salary".into(),
    })
    .unwrap();
    let key = GrainKey::from("alice");
    let reply = silo
        .call_named("account", key.clone(), "deposit", &deposit)
        .await
        .unwrap();
    assert_eq!(decode::<Result<i64, String>>(&reply).unwrap(), Ok(40));
    silo.tell_named("account", key.clone(), "deposit", &deposit)
        .await
        .unwrap();
    // The same grain, reached by name and by type.
    let by_type = silo.grain::<Account>("alice").call(Balance).await.unwrap();
    assert_eq!(by_type, 80);
    let by_name = silo
        .call_named("account", key, "balance", &encode(&Balance).unwrap())
        .await
        .unwrap();
    assert_eq!(decode::<i64>(&by_name).unwrap(), 80);
    // The handler's own error is part of the reply, not a dispatch error.
    let refused = silo
        .call_named(
            "account",
            GrainKey::from("bob"),
            "deposit",
            &encode(&Deposit {
                amount: -5,
                memo: "oops".into(),
            })
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        decode::<Result<i64, String>>(&refused).unwrap(),
        Err("oops: not a deposit".into())
    );
    silo.shutdown().await;
}

#[tokio::test]
async fn unknown_names_and_bad_bytes_are_typed_errors_and_the_silo_keeps_serving() {
    let silo = silo();
    let key = GrainKey::from("carol");
    assert_eq!(
        silo.call_named("acount", key.clone(), "deposit", &[])
            .await
            .unwrap_err(),
        DispatchError::UnknownGrainType("acount".into())
    );
    assert_eq!(
        silo.call_named("account", key.clone(), "close", &[])
            .await
            .unwrap_err(),
        DispatchError::UnknownMessage {
            grain_type: "account".into(),
            message: "close".into()
        }
    );
    for garbage in [&[][..], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..], &[3, 1]] {
        match silo
            .call_named("account", key.clone(), "deposit", garbage)
            .await
        {
            Err(DispatchError::BadPayload { what, .. }) => assert!(what.ends_with("Deposit")),
            other => panic!("{garbage:?}: {other:?}"),
        }
    }
    // Nothing was activated for the bad messages, and the grain still
    // serves good ones.
    assert_eq!(silo.activations_started(), 0);
    let ok = silo
        .call_named(
            "account",
            key,
            "deposit",
            &encode(&Deposit {
                amount: 1,
                memo: String::new(),
            })
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(decode::<Result<i64, String>>(&ok).unwrap(), Ok(1));
    silo.shutdown().await;
    assert_eq!(
        silo.call_named(
            "account",
            GrainKey::from("dave"),
            "balance",
            &encode(&Balance).unwrap()
        )
        .await
        .unwrap_err(),
        DispatchError::Call(CallError::ShutDown)
    );
}

#[test]
fn registration_mistakes_are_caught_when_the_silo_is_built() {
    let twice = Silo::builder()
        .register::<Account>("account")
        .message::<Account, Deposit>("deposit")
        .message::<Account, Balance>("deposit")
        .build()
        .unwrap_err();
    assert_eq!(
        twice,
        SiloError::DuplicateMessage {
            grain_type: "account".into(),
            message: "deposit".into()
        }
    );
    let early = Silo::builder()
        .message::<Account, Deposit>("deposit")
        .register::<Account>("account")
        .build()
        .unwrap_err();
    assert!(matches!(early, SiloError::InvalidConfig(_)), "{early:?}");
}
