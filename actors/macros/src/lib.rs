//! Derives for Granary's actor runtime, re-exported by `granary-actors`
//! next to the traits they implement (as serde does): depend on
//! `granary-actors` and write `use granary_actors::{GrainType, Message};`.
//!
//! - [`Message`](macro@Message) implements `Message` (the reply type) and
//!   `NamedMessage` (the stable name the message travels under between
//!   silos).
//! - [`GrainType`](macro@GrainType) implements `GrainType`: the grain
//!   type's stable name, how it is activated, and the messages it accepts
//!   by name, so that `SiloBuilder::host::<G>()` registers all of it in
//!   one line.
//!
//! Each name is written once, where the type is declared, and checked
//! when the crate compiles: a message the grain does not handle, a message
//! without a name, and two messages of one grain type under one name (two
//! calls or tells, or two reads: a read may share a write's name, as they
//! are dispatched apart) are compile errors, not failures at the first
//! call. What only the whole
//! silo can see (two grain types under one name, a type hosted twice) is
//! refused by `SiloBuilder::build`.
//!
//! The generated code names the runtime as `::granary_actors`; a crate
//! that reaches it under another path (the `granary` facade re-exports it
//! as `granary::actors`) says so with `crate = granary::actors` in the
//! attribute.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{ToTokens, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::meta::ParseNestedMeta;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{DeriveInput, Expr, LitStr, Path, Token, Type, parse_macro_input, parse_quote};

/// Implements `Message` and `NamedMessage` for a message type.
///
/// - `#[message(reply = T)]`: what the handler answers (default `()`).
/// - `#[message(name = "apply")]`: the stable name the message travels
///   under between silos, per grain type (default: the type's
///   identifier, here `Apply`). Rename the type freely once a name is
///   set: silos built from different binaries agree on names, not on
///   Rust types.
/// - `#[message(crate = path)]`: where `granary_actors` is, if not at
///   `::granary_actors`.
///
/// ```
/// use granary_actors::{Message, NamedMessage};
/// use serde::{Deserialize, Serialize};
///
/// /// Adds to a balance; answers the new balance.
/// #[derive(Message, Serialize, Deserialize)]
/// #[message(reply = i64)]
/// struct Deposit(i64);
///
/// /// Answers nothing, under a name of its own.
/// #[derive(Message, Serialize, Deserialize)]
/// #[message(name = "close")]
/// struct CloseAccount;
///
/// assert_eq!(Deposit::NAME, "Deposit");
/// assert_eq!(CloseAccount::NAME, "close");
/// let _: <CloseAccount as Message>::Reply = ();
/// ```
///
/// A message is `'static` (it is queued in a mailbox), so a type with a
/// lifetime parameter is refused; an empty name is refused too.
///
/// ```compile_fail
/// use granary_actors::Message;
///
/// #[derive(Message)]
/// #[message(name = "")]
/// struct Nameless;
/// ```
#[proc_macro_derive(Message, attributes(message))]
pub fn derive_message(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    message::expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Implements `GrainType` for a grain: its stable name, how it is
/// activated, and the messages it accepts from other silos, so that
/// `SiloBuilder::host::<G>()` registers it in one line.
///
/// In `#[grain(...)]`, all optional:
///
/// - `name = "ledger"`: the grain type's stable name (default: the type's
///   identifier). Cluster nodes list hosted grain types by it.
/// - `messages(A, B)`: messages accepted by name, each handled by
///   `Handler` and named by `NamedMessage` (`#[derive(Message)]`), with
///   serde on the message and its reply.
/// - `reads(C)`: read-only messages (`ReadHandler`), which travel between
///   silos as reads.
/// - `remindable`: the grain holds reminders (it handles `ReminderFired`).
/// - `migratable`: the grain moves between silos with its in-memory state
///   (it implements `migration::Migratable`); never with `stateless`.
/// - `stateless(max_workers = 8)`: a stateless worker, up to that many
///   activations per key (rule 9 of the silo's protocol).
/// - `crate = path`: where `granary_actors` is, if not at
///   `::granary_actors`.
///
/// ```
/// use granary_actors::{
///     Grain, GrainContext, GrainKey, GrainType, Handler, Message, ReadHandler, Silo,
/// };
/// use serde::{Deserialize, Serialize};
///
/// #[derive(GrainType)]
/// #[grain(name = "ledger", messages(Apply), reads(Balance))]
/// struct Ledger(i64);
/// impl Grain for Ledger {
///     fn new(_: &GrainKey) -> Ledger {
///         Ledger(0)
///     }
/// }
///
/// #[derive(Message, Serialize, Deserialize)]
/// #[message(name = "apply", reply = i64)]
/// struct Apply(i64);
/// impl Handler<Apply> for Ledger {
///     async fn handle(&mut self, Apply(n): Apply, _: &mut GrainContext) -> i64 {
///         self.0 += n;
///         self.0
///     }
/// }
///
/// #[derive(Message, Serialize, Deserialize)]
/// #[message(reply = i64)]
/// struct Balance;
/// impl ReadHandler<Balance> for Ledger {
///     async fn handle_read(&self, _: Balance, _: &GrainContext) -> i64 {
///         self.0
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let silo = Silo::builder().host::<Ledger>().build()?;
/// assert_eq!(silo.grain_type_name::<Ledger>(), Some("ledger"));
/// assert_eq!(silo.message_name::<Ledger, Apply>(), Some("apply"));
///
/// // By name, as a message from another silo arrives.
/// let payload = granary_actors::dispatch::encode(&Apply(5))?;
/// let reply = silo.call_named(Ledger::NAME, "alice".into(), "apply", &payload).await?;
/// assert_eq!(granary_actors::dispatch::decode::<i64>(&reply)?, 5);
/// assert_eq!(silo.grain::<Ledger>("alice").read(Balance).await?, 5);
/// silo.shutdown().await;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
///
/// A message the grain does not handle is a compile error, not a failure
/// at the first call:
///
/// ```compile_fail
/// use granary_actors::{Grain, GrainKey, GrainType, Message};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(GrainType)]
/// #[grain(messages(Apply))]
/// struct Ledger;
/// impl Grain for Ledger {
///     fn new(_: &GrainKey) -> Ledger {
///         Ledger
///     }
/// }
///
/// #[derive(Message, Serialize, Deserialize)]
/// struct Apply; // no `impl Handler<Apply> for Ledger`
/// ```
///
/// So are two messages (or two reads) of one grain type under one name:
///
/// ```compile_fail
/// use granary_actors::{Grain, GrainContext, GrainKey, GrainType, Handler, Message};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(GrainType)]
/// #[grain(messages(Open, Reopen))]
/// struct Account;
/// impl Grain for Account {
///     fn new(_: &GrainKey) -> Account {
///         Account
///     }
/// }
///
/// #[derive(Message, Serialize, Deserialize)]
/// #[message(name = "open")]
/// struct Open;
/// impl Handler<Open> for Account {
///     async fn handle(&mut self, _: Open, _: &mut GrainContext) {}
/// }
///
/// #[derive(Message, Serialize, Deserialize)]
/// #[message(name = "open")]
/// struct Reopen;
/// impl Handler<Reopen> for Account {
///     async fn handle(&mut self, _: Reopen, _: &mut GrainContext) {}
/// }
/// ```
///
/// A generic grain is refused: every instantiation would share one name.
/// Implement `GrainType` by hand for each instantiation registered, each
/// under a name of its own.
///
/// ```compile_fail
/// use granary_actors::{Grain, GrainKey, GrainType};
///
/// #[derive(GrainType)]
/// struct Cache<T: Send + Sync + 'static>(Option<T>);
/// impl<T: Send + Sync + 'static> Grain for Cache<T> {
///     fn new(_: &GrainKey) -> Cache<T> {
///         Cache(None)
///     }
/// }
/// ```
///
/// So is a stateless worker with no activations, written as a literal or
/// as a const:
///
/// ```compile_fail,E0080
/// use granary_actors::{Grain, GrainKey, GrainType};
///
/// const WORKERS: usize = 0;
///
/// #[derive(GrainType)]
/// #[grain(stateless(max_workers = WORKERS))]
/// struct Resizer;
/// impl Grain for Resizer {
///     fn new(_: &GrainKey) -> Resizer {
///         Resizer
///     }
/// }
/// ```
#[proc_macro_derive(GrainType, attributes(grain))]
pub fn derive_grain_type(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    grain::expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// The path the generated code names the runtime by.
fn runtime_path(krate: Option<Path>) -> Path {
    krate.unwrap_or_else(|| parse_quote!(::granary_actors))
}

/// A stable name from `name = "..."`: not empty.
fn parse_name(meta: &ParseNestedMeta<'_>, what: &str) -> syn::Result<LitStr> {
    let name: LitStr = meta.value()?.parse()?;
    if name.value().is_empty() {
        return Err(syn::Error::new(
            name.span(),
            format!("{what} name is empty: a stable name needs at least one character"),
        ));
    }
    Ok(name)
}

/// A grain type's name within the runtime's bounds: the same rules as
/// `granary_actors::grain_type_name_error`, which the silo's builder applies
/// to names registered by hand (the macro cannot call it: the runtime
/// depends on this crate).
fn grain_type_name(name: &LitStr) -> syn::Result<()> {
    let value = name.value();
    if value.len() > 256 {
        return Err(syn::Error::new(
            name.span(),
            format!(
                "a grain type name of {} bytes; at most 256 (a cluster's directory refuses longer ones)",
                value.len()
            ),
        ));
    }
    if value.starts_with('$') || value.starts_with("granary.") {
        return Err(syn::Error::new(
            name.span(),
            "names starting with `$` or `granary.` are the runtime's own (its services and records)",
        ));
    }
    Ok(())
}

/// `crate = path`.
fn parse_crate(meta: &ParseNestedMeta<'_>) -> syn::Result<Path> {
    meta.value()?.parse()
}

/// Refuses a setting given twice in one derive's attributes.
fn once<T>(slot: &Option<T>, meta: &ParseNestedMeta<'_>, what: &str) -> syn::Result<()> {
    if slot.is_some() {
        return Err(meta.error(format!("`{what}` is given twice")));
    }
    Ok(())
}

/// The text of a type as written, for messages (`Foo<u8>`, not
/// `Foo < u8 >`).
fn type_text(ty: &Type) -> String {
    ty.to_token_stream()
        .to_string()
        .replace(" < ", "<")
        .replace(" <", "<")
        .replace(" >", ">")
        .replace(" , ", ", ")
        .replace(" :: ", "::")
}

mod message {
    use super::*;

    /// What `#[message(...)]` says.
    #[derive(Default)]
    struct Settings {
        reply: Option<Type>,
        name: Option<LitStr>,
        krate: Option<Path>,
    }

    fn settings(input: &DeriveInput) -> syn::Result<Settings> {
        let mut settings = Settings::default();
        for attr in input
            .attrs
            .iter()
            .filter(|attr| attr.path().is_ident("message"))
        {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("reply") {
                    once(&settings.reply, &meta, "reply")?;
                    settings.reply = Some(meta.value()?.parse()?);
                } else if meta.path.is_ident("name") {
                    once(&settings.name, &meta, "name")?;
                    settings.name = Some(parse_name(&meta, "the message")?);
                } else if meta.path.is_ident("crate") {
                    once(&settings.krate, &meta, "crate")?;
                    settings.krate = Some(parse_crate(&meta)?);
                } else {
                    return Err(meta.error(
                        "unknown `message` setting: expected `reply = Type`, \
                         `name = \"...\"` or `crate = path`",
                    ));
                }
                Ok(())
            })?;
        }
        Ok(settings)
    }

    pub(crate) fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
        if let Some(lifetime) = input.generics.lifetimes().next() {
            return Err(syn::Error::new(
                lifetime.span(),
                "a message cannot borrow: it waits in a mailbox and may cross silos, \
                 so it is 'static (own the data instead of the lifetime parameter)",
            ));
        }
        let settings = settings(input)?;
        let runtime = runtime_path(settings.krate);
        let ident = &input.ident;
        let name = settings
            .name
            .unwrap_or_else(|| LitStr::new(&ident.unraw().to_string(), ident.span()));
        let reply_type: Type = settings.reply.unwrap_or_else(|| parse_quote!(()));
        let reply = quote_spanned!(reply_type.span()=> type Reply = #reply_type;);
        // A message waits in a mailbox and may cross threads: a generic
        // one is bounded by what `Message` needs, the type and its reply
        // `Send + 'static`, and no more (a parameter behind `PhantomData`
        // of a function, say, need not be `Send` itself).
        let mut generics = input.generics.clone();
        if generics.type_params().next().is_some() {
            let (_, type_generics, _) = input.generics.split_for_impl();
            let predicates = &mut generics.make_where_clause().predicates;
            predicates.push(parse_quote!(
                #ident #type_generics: ::core::marker::Send + 'static
            ));
            predicates.push(parse_quote!(#reply_type: ::core::marker::Send + 'static));
        }
        let (impl_generics, type_generics, where_clause) = generics.split_for_impl();
        Ok(quote! {
            impl #impl_generics #runtime::Message for #ident #type_generics #where_clause {
                #reply
            }
            impl #impl_generics #runtime::NamedMessage for #ident #type_generics #where_clause {
                const NAME: &'static ::core::primitive::str = #name;
            }
        })
    }
}

mod grain {
    use super::*;

    /// What `#[grain(...)]` says.
    #[derive(Default)]
    struct Settings {
        name: Option<LitStr>,
        messages: Vec<Type>,
        reads: Vec<Type>,
        remindable: Option<Span>,
        migratable: Option<Span>,
        stateless: Option<Expr>,
        krate: Option<Path>,
    }

    /// `(A, B<u8>, ...)`, after `messages` or `reads`.
    fn types(meta: &ParseNestedMeta<'_>, what: &str) -> syn::Result<Vec<Type>> {
        if !meta.input.peek(syn::token::Paren) {
            return Err(meta.error(format!(
                "`{what}` lists message types in parentheses: `{what}(A, B)`"
            )));
        }
        let content;
        syn::parenthesized!(content in meta.input);
        Ok(Punctuated::<Type, Token![,]>::parse_terminated(&content)?
            .into_iter()
            .collect())
    }

    /// `(max_workers = N)`, after `stateless`.
    fn stateless(meta: &ParseNestedMeta<'_>) -> syn::Result<Expr> {
        const USAGE: &str = "`stateless` needs the most activations per key: \
                             `stateless(max_workers = 8)`";
        if !meta.input.peek(syn::token::Paren) {
            return Err(meta.error(USAGE));
        }
        let mut max_workers: Option<Expr> = None;
        meta.parse_nested_meta(|inner| {
            if inner.path.is_ident("max_workers") {
                once(&max_workers, &inner, "max_workers")?;
                let value: Expr = inner.value()?.parse()?;
                if let Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Int(int),
                    ..
                }) = &value
                {
                    if int.base10_parse::<usize>()? == 0 {
                        return Err(syn::Error::new(
                            int.span(),
                            "`max_workers` is 0: a stateless worker needs at least one activation",
                        ));
                    }
                }
                max_workers = Some(value);
                Ok(())
            } else {
                Err(inner.error("unknown `stateless` setting: expected `max_workers = N`"))
            }
        })?;
        max_workers.ok_or_else(|| meta.error(USAGE))
    }

    fn settings(input: &DeriveInput) -> syn::Result<Settings> {
        let mut settings = Settings::default();
        for attr in input
            .attrs
            .iter()
            .filter(|attr| attr.path().is_ident("grain"))
        {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("name") {
                    once(&settings.name, &meta, "name")?;
                    let name = parse_name(&meta, "the grain type")?;
                    grain_type_name(&name)?;
                    settings.name = Some(name);
                } else if meta.path.is_ident("messages") {
                    settings.messages.extend(types(&meta, "messages")?);
                } else if meta.path.is_ident("reads") {
                    settings.reads.extend(types(&meta, "reads")?);
                } else if meta.path.is_ident("remindable") {
                    once(&settings.remindable, &meta, "remindable")?;
                    if !meta.input.is_empty() && !meta.input.peek(Token![,]) {
                        return Err(meta.error("`remindable` takes no value"));
                    }
                    settings.remindable = Some(meta.path.span());
                } else if meta.path.is_ident("migratable") {
                    once(&settings.migratable, &meta, "migratable")?;
                    if !meta.input.is_empty() && !meta.input.peek(Token![,]) {
                        return Err(meta.error("`migratable` takes no value"));
                    }
                    settings.migratable = Some(meta.path.span());
                } else if meta.path.is_ident("stateless") {
                    once(&settings.stateless, &meta, "stateless")?;
                    settings.stateless = Some(stateless(&meta)?);
                } else if meta.path.is_ident("crate") {
                    once(&settings.krate, &meta, "crate")?;
                    settings.krate = Some(parse_crate(&meta)?);
                } else {
                    return Err(meta.error(
                        "unknown `grain` setting: expected `name = \"...\"`, `messages(...)`, \
                         `reads(...)`, `remindable`, `migratable`, \
                         `stateless(max_workers = N)` or `crate = path`",
                    ));
                }
                Ok(())
            })?;
        }
        for (list, what) in [(&settings.messages, "messages"), (&settings.reads, "reads")] {
            for (i, ty) in list.iter().enumerate() {
                let text = ty.to_token_stream().to_string();
                if list[..i]
                    .iter()
                    .any(|earlier| earlier.to_token_stream().to_string() == text)
                {
                    return Err(syn::Error::new_spanned(
                        ty,
                        format!("`{}` is listed twice in `{what}`", type_text(ty)),
                    ));
                }
            }
        }
        Ok(settings)
    }

    /// Compile-time checks that no two messages in `list` share a name
    /// (nor one with the reminder's message, `reminder`): each is a `const`
    /// comparison of the messages' `NamedMessage::NAME`s.
    fn distinct_names(
        grain: &syn::Ident,
        runtime: &Path,
        list: &[Type],
        reminder: bool,
    ) -> Vec<TokenStream2> {
        let mut checks = Vec::new();
        let named = |ty: &Type| quote!(<#ty as #runtime::NamedMessage>::NAME);
        for (i, first) in list.iter().enumerate() {
            for second in &list[i + 1..] {
                let text = format!(
                    "grain type `{grain}` accepts `{}` and `{}` under one message name: \
                     give one of them another with #[message(name = \"...\")]",
                    type_text(first),
                    type_text(second),
                )
                .replace('{', "{{")
                .replace('}', "}}");
                let (a, b) = (named(first), named(second));
                checks.push(quote_spanned! {second.span()=>
                    if #runtime::__private::str_eq(#a, #b) {
                        ::core::panic!(#text);
                    }
                });
            }
            if reminder {
                let text = format!(
                    "grain type `{grain}` is remindable, and its message `{}` takes the reminder's \
                     message name: give it another with #[message(name = \"...\")]",
                    type_text(first),
                )
                .replace('{', "{{")
                .replace('}', "}}");
                let a = named(first);
                checks.push(quote_spanned! {first.span()=>
                    if #runtime::__private::str_eq(#a, #runtime::REMINDER_FIRED) {
                        ::core::panic!(#text);
                    }
                });
            }
        }
        checks
    }

    pub(crate) fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
        if !input.generics.params.is_empty() {
            return Err(syn::Error::new_spanned(
                &input.generics,
                "#[derive(GrainType)] does not take generic types: every instantiation would \
                 share one grain type name. Implement `GrainType` by hand for each \
                 instantiation you host, each under a name of its own",
            ));
        }
        let settings = settings(input)?;
        let runtime = runtime_path(settings.krate);
        let ident = &input.ident;
        let name = settings
            .name
            .unwrap_or_else(|| LitStr::new(&ident.unraw().to_string(), ident.span()));
        if let (Some(span), Some(_)) = (settings.migratable, &settings.stateless) {
            return Err(syn::Error::new(
                span,
                "a stateless worker is local to each silo and cannot be `migratable`",
            ));
        }
        let stateless = settings.stateless.as_ref().map(|max_workers| {
            quote_spanned! {max_workers.span()=>
                const STATELESS: ::core::option::Option<::core::primitive::usize> =
                    ::core::option::Option::Some(#max_workers);
            }
        });
        let messages = settings
            .messages
            .iter()
            .map(|ty| quote_spanned!(ty.span()=> .message::<#ty>()));
        let reads = settings
            .reads
            .iter()
            .map(|ty| quote_spanned!(ty.span()=> .read::<#ty>()));
        let remindable = settings
            .remindable
            .map(|span| quote_spanned!(span=> .remindable()));
        let migratable = settings
            .migratable
            .map(|span| quote_spanned!(span=> .migratable()));
        let mut checks = distinct_names(
            ident,
            &runtime,
            &settings.messages,
            settings.remindable.is_some(),
        );
        checks.extend(distinct_names(ident, &runtime, &settings.reads, false));
        // A literal 0 was refused when parsed; any other expression (a
        // const, `Self::N`) is checked through the impl when the crate
        // compiles, not when the silo is built.
        if let Some(max_workers) = settings
            .stateless
            .as_ref()
            .filter(|max_workers| !matches!(max_workers, Expr::Lit(_)))
        {
            checks.push(quote_spanned! {max_workers.span()=>
                if let ::core::option::Option::Some(0) =
                    <#ident as #runtime::GrainType>::STATELESS
                {
                    ::core::panic!(
                        "`max_workers` is 0: a stateless worker needs at least one activation"
                    );
                }
            });
        }
        let checks = (!checks.is_empty()).then(|| quote!(const _: () = { #(#checks)* };));
        Ok(quote! {
            impl #runtime::GrainType for #ident {
                const NAME: &'static ::core::primitive::str = #name;
                #stateless
                fn accepts(
                    registration: #runtime::Registration<Self>,
                ) -> #runtime::Registration<Self> {
                    registration #(#messages)* #(#reads)* #remindable #migratable
                }
            }
            #checks
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(input: DeriveInput) -> Result<String, String> {
        message::expand(&input)
            .map(|tokens| tokens.to_string())
            .map_err(|err| err.to_string())
    }

    fn grain(input: DeriveInput) -> Result<String, String> {
        grain::expand(&input)
            .map(|tokens| tokens.to_string())
            .map_err(|err| err.to_string())
    }

    #[test]
    fn a_grain_type_name_the_runtime_keeps_or_too_long_is_refused() {
        for (name, why) in [
            ("$directory", "the runtime's own"),
            ("granary.reminders", "the runtime's own"),
            (&*"g".repeat(257), "at most 256"),
        ] {
            let input: DeriveInput =
                syn::parse_str(&format!("#[grain(name = {name:?})] struct Account;")).unwrap();
            let err = grain(input).unwrap_err();
            assert!(err.contains(why), "{name}: {err}");
        }
        let input: DeriveInput = syn::parse_str(&format!(
            "#[grain(name = {:?})] struct Account;",
            "g".repeat(256)
        ))
        .unwrap();
        assert!(grain(input).is_ok());
    }

    #[test]
    fn a_message_is_named_after_its_type_and_answers_unit_by_default() {
        let out = message(parse_quote!(
            struct Touch;
        ))
        .unwrap();
        assert!(out.contains("type Reply = () ;"), "{out}");
        assert!(
            out.contains("const NAME : & 'static :: core :: primitive :: str = \"Touch\""),
            "{out}"
        );
        assert!(
            out.contains(":: granary_actors :: NamedMessage for Touch"),
            "{out}"
        );
    }

    #[test]
    fn a_raw_identifier_names_the_message_without_its_prefix() {
        let out = message(parse_quote!(
            struct r#Move;
        ))
        .unwrap();
        assert!(out.contains("\"Move\""), "{out}");
    }

    #[test]
    fn a_message_takes_its_reply_name_and_crate() {
        let out = message(parse_quote!(
            #[message(reply = Result<u64, String>, name = "apply")]
            #[message(crate = granary::actors)]
            enum Apply {
                One,
            }
        ))
        .unwrap();
        assert!(
            out.contains("type Reply = Result < u64 , String >"),
            "{out}"
        );
        assert!(out.contains("\"apply\""), "{out}");
        assert!(
            out.contains("impl granary :: actors :: Message for Apply"),
            "{out}"
        );
    }

    #[test]
    fn a_generic_message_gets_send_and_static_bounds() {
        let out = message(parse_quote!(
            #[message(reply = Option<T>)]
            struct Wrapped<T, U>(T, U);
        ))
        .unwrap();
        assert!(
            out.contains(
                "impl < T , U > :: granary_actors :: Message for Wrapped < T , U > where Wrapped < \
                 T , U > : :: core :: marker :: Send + 'static , Option < T > : :: core :: marker \
                 :: Send + 'static"
            ),
            "{out}"
        );
    }

    #[test]
    fn a_generic_message_keeps_its_bounds() {
        let out = message(parse_quote!(
            #[message(reply = T)]
            struct Echo<T: Send + 'static>(T)
            where
                T: Clone;
        ))
        .unwrap();
        assert!(
            out.contains(
                "impl < T : Send + 'static > :: granary_actors :: Message for Echo < T > where T : Clone"
            ),
            "{out}"
        );
    }

    #[test]
    fn message_mistakes_are_errors_with_reasons() {
        let cases: [(DeriveInput, &str); 6] = [
            (
                parse_quote!(
                    #[message(name = "")]
                    struct A;
                ),
                "the message name is empty",
            ),
            (
                parse_quote!(
                    #[message(name = "a", name = "b")]
                    struct A;
                ),
                "`name` is given twice",
            ),
            (
                parse_quote!(
                    #[message(reply = u8)]
                    #[message(reply = u16)]
                    struct A;
                ),
                "`reply` is given twice",
            ),
            (
                parse_quote!(
                    #[message(replies = u8)]
                    struct A;
                ),
                "unknown `message` setting",
            ),
            (
                parse_quote!(
                    #[message(name = apply)]
                    struct A;
                ),
                "expected string literal",
            ),
            (
                parse_quote!(
                    struct Borrowed<'a>(&'a str);
                ),
                "a message cannot borrow",
            ),
        ];
        for (input, expected) in cases {
            let err = message(input).unwrap_err();
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
        }
    }

    #[test]
    fn a_grain_registers_its_messages_reads_and_reminders_in_order() {
        let out = grain(parse_quote!(
            #[grain(name = "ledger", messages(Apply, Notify<u8>), reads(Look))]
            #[grain(remindable, migratable)]
            struct Ledger;
        ))
        .unwrap();
        assert!(
            out.contains("const NAME : & 'static :: core :: primitive :: str = \"ledger\""),
            "{out}"
        );
        assert!(
            out.contains(
                "registration . message :: < Apply > () . message :: < Notify < u8 > > () \
                 . read :: < Look > () . remindable () . migratable ()"
            ),
            "{out}"
        );
        assert!(!out.contains("STATELESS"), "{out}");
        // Apply/Notify, and each against the reminder's name; one read
        // has nothing to be compared with.
        assert_eq!(out.matches("str_eq").count(), 3, "{out}");
        assert!(out.contains("REMINDER_FIRED"), "{out}");
    }

    #[test]
    fn a_bare_grain_is_named_after_its_type_and_accepts_nothing_by_name() {
        let out = grain(parse_quote!(
            struct Counter(u64);
        ))
        .unwrap();
        assert!(out.contains("\"Counter\""), "{out}");
        assert!(out.contains("{ registration }"), "{out}");
        assert!(!out.contains("const _"), "{out}");
    }

    #[test]
    fn a_stateless_grain_says_how_many_workers() {
        let out = grain(parse_quote!(
            #[grain(stateless(max_workers = 8))]
            struct Resizer;
        ))
        .unwrap();
        assert!(
            out.contains(
                "const STATELESS : :: core :: option :: Option < :: core :: primitive :: usize > = :: core :: option :: Option :: Some (8)"
            ),
            "{out}"
        );
        let out = grain(parse_quote!(
            #[grain(stateless(max_workers = WORKERS), crate = granary::actors)]
            struct Resizer;
        ))
        .unwrap();
        assert!(out.contains("Some (WORKERS)"), "{out}");
        // A const is checked, through the impl, when the crate compiles.
        assert!(
            out.contains(
                "if let :: core :: option :: Option :: Some (0) = < Resizer as granary :: \
                 actors :: GrainType > :: STATELESS"
            ),
            "{out}"
        );
        assert!(
            out.contains("impl granary :: actors :: GrainType for Resizer"),
            "{out}"
        );
    }

    #[test]
    fn grain_mistakes_are_errors_with_reasons() {
        let cases: [(DeriveInput, &str); 13] = [
            (
                parse_quote!(
                    struct Cache<T>(T);
                ),
                "does not take generic types",
            ),
            (
                parse_quote!(
                    #[grain(name = "")]
                    struct A;
                ),
                "the grain type name is empty",
            ),
            (
                parse_quote!(
                    #[grain(name = "a")]
                    #[grain(name = "b")]
                    struct A;
                ),
                "`name` is given twice",
            ),
            (
                parse_quote!(
                    #[grain(messages(Apply, Look, Apply))]
                    struct A;
                ),
                "`Apply` is listed twice in `messages`",
            ),
            (
                parse_quote!(
                    #[grain(reads(Look<u8>))]
                    #[grain(reads(Look<u8>))]
                    struct A;
                ),
                "`Look<u8>` is listed twice in `reads`",
            ),
            (
                parse_quote!(
                    #[grain(messages = Apply)]
                    struct A;
                ),
                "`messages` lists message types in parentheses",
            ),
            (
                parse_quote!(
                    #[grain(stateless)]
                    struct A;
                ),
                "`stateless` needs the most activations per key",
            ),
            (
                parse_quote!(
                    #[grain(stateless(max_workers = 0))]
                    struct A;
                ),
                "`max_workers` is 0",
            ),
            (
                parse_quote!(
                    #[grain(stateless(workers = 2))]
                    struct A;
                ),
                "unknown `stateless` setting",
            ),
            (
                parse_quote!(
                    #[grain(remindable = true)]
                    struct A;
                ),
                "`remindable` takes no value",
            ),
            (
                parse_quote!(
                    #[grain(migratable = true)]
                    struct A;
                ),
                "`migratable` takes no value",
            ),
            (
                parse_quote!(
                    #[grain(migratable, stateless(max_workers = 2))]
                    struct A;
                ),
                "cannot be `migratable`",
            ),
            (
                parse_quote!(
                    #[grain(message(Apply))]
                    struct A;
                ),
                "unknown `grain` setting",
            ),
        ];
        for (input, expected) in cases {
            let err = grain(input).unwrap_err();
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
        }
    }

    #[test]
    fn a_message_listed_as_both_call_and_read_is_not_a_duplicate() {
        let out = grain(parse_quote!(
            #[grain(messages(Look), reads(Look))]
            struct A;
        ))
        .unwrap();
        assert!(
            out.contains(". message :: < Look > () . read :: < Look > ()"),
            "{out}"
        );
    }
}
