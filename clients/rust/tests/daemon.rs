//! Against a running daemon, when `FSE_TEST_ADDR` names one (e.g.
//! `FSE_TEST_ADDR=unix:/tmp/fse.sock cargo test`); skipped otherwise, so
//! `make test` needs no daemon. Policy `FSE_TEST_HALT_POLICY` (if set) must halt
//! at token 0, like a policy with `[guards.l2_norm] threshold = 10.0`.

use fse_client::{Client, Code, Completion, ConnectOptions, Event, Request, Status};
use tokio_stream::StreamExt;

async fn client() -> Option<Client> {
    let addr = std::env::var("FSE_TEST_ADDR").ok()?;
    Some(
        Client::connect(&addr, ConnectOptions::new())
            .await
            .expect("connect"),
    )
}

#[tokio::test]
async fn greedy_generation_completes_and_events_add_up() {
    let Some(client) = client().await else { return };
    let request = Request::prompt("The capital of France is")
        .max_tokens(8)
        .temperature(0.0);
    let mut generation = client.generate(request).await.unwrap();
    let (mut started, mut text, mut verdict) = (None, String::new(), None);
    while let Some(event) = generation.next().await {
        match event.unwrap() {
            Event::Started(s) => started = Some(s),
            Event::Token(t) => text.push_str(&t.text),
            Event::Verdict(v) => verdict = Some(v),
        }
    }
    let (started, verdict) = (started.expect("Started first"), verdict.expect("a verdict"));
    assert_eq!(verdict.status, Status::Completed);
    assert_eq!(verdict.completion, Some(Completion::MaxTokens));
    assert_eq!(verdict.tokens, 8);
    assert_eq!(verdict.text, text);
    assert_eq!(verdict.policy, started.policy);
}

#[tokio::test]
async fn cancel_yields_a_cancelled_verdict() {
    let Some(client) = client().await else { return };
    let request = Request::prompt("Write a long story")
        .max_tokens(200)
        .temperature(0.0);
    let mut generation = client.generate(request).await.unwrap();
    let canceller = generation.canceller();
    while let Some(event) = generation.next().await {
        match event.unwrap() {
            Event::Token(_) => canceller.cancel(),
            Event::Verdict(v) => {
                assert_eq!(v.status, Status::Cancelled);
                assert!(v.tokens < 200);
            }
            Event::Started(_) => {}
        }
    }
}

#[tokio::test]
async fn halting_policy_is_a_verdict_not_an_error() {
    let Some(client) = client().await else { return };
    let Ok(policy) = std::env::var("FSE_TEST_HALT_POLICY") else {
        return;
    };
    let request = Request::prompt("The capital of France is")
        .max_tokens(8)
        .policy(policy);
    let verdict = client
        .generate(request)
        .await
        .unwrap()
        .verdict()
        .await
        .unwrap();
    assert_eq!(verdict.status, Status::Halted);
    assert_eq!(verdict.token_index, Some(0));
    assert!(verdict.guard.is_some() && verdict.value.is_some());
}

#[tokio::test]
async fn bad_request_is_invalid_argument_naming_the_field() {
    let Some(client) = client().await else { return };
    let request = Request::prompt("x").max_tokens(8).top_p(7.0);
    let err = match client.generate(request).await {
        Ok(generation) => generation.verdict().await.unwrap_err(),
        Err(err) => err,
    };
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("top_p"), "{err}");
}

#[tokio::test]
async fn info_lists_the_default_policy() {
    let Some(client) = client().await else { return };
    let info = client.info().await.unwrap();
    assert!(
        info.policies
            .iter()
            .any(|p| p.name == "default" && p.builtin)
    );
    assert!(info.limits.unwrap().max_tokens >= 1);
    // Every layer is on exactly one device; the backend is named.
    let model = info.model.unwrap();
    let placed: u32 = model.devices.iter().map(|d| d.layers).sum();
    assert!(model.layers > 0 && placed == model.layers && !model.backend.is_empty());
}
