//! The aggregate filter on whole requests with the bundled configuration: client paths and
//! identities, and backends that answer anything (odd statuses, Cache-Control, Vary, content
//! types, JSON that is not what was expected, bytes that are not JSON). Calls never leave their
//! templated path, a reply built from the caller's identity is never public, and every reply
//! is well formed.

use std::collections::HashSet;
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use serde_json::{json, Value};
use tollgate_aggregate::AggregateRoot;
use tollgate_common::mem_host::MemHost;
use tollgate_common::{CallResponse, Decision, HttpFilter, RootFilter};

use crate::gen::{json as random_json, mutate, text};
use crate::targets::next_unanswered;

fn config() -> Option<&'static str> {
    static CELL: OnceLock<Option<String>> = OnceLock::new();
    CELL.get_or_init(|| {
        crate::seeds::bundled()
            .iter()
            .find(|(f, _)| f == "aggregate")
            .map(|(_, s)| s.clone())
    })
    .as_deref()
}

const VALUES: &[&str] = &[
    "alice", "2", "..", ".", "%2e%2e", "a/b", "", " ", "é", "?x=1", "#", "%", "a%2Fb",
];
const CC: &[&str] = &[
    "public, max-age=60",
    "max-age=5, max-age=70",
    "no-store",
    "private",
    "no-cache",
    "s-maxage=0",
    "max-age=x",
    "",
    ",",
    "public, max-age=18446744073709551616",
];
const KEYS: &[&str] = &[
    "id",
    "name",
    "email",
    "company_id",
    "items",
    "total",
    "status",
];

fn answer(u: &mut Unstructured<'_>) -> Result<CallResponse> {
    if u.ratio(1, 10)? {
        // The call failed before any answer (reset, timeout, no upstream).
        return Ok(CallResponse::default());
    }
    let status = *u.choose(&[
        "200", "200", "200", "201", "204", "304", "404", "500", "503", "x",
    ])?;
    let mut headers = vec![(":status".to_string(), status.to_string())];
    if u.arbitrary()? {
        headers.push(("cache-control".into(), (*u.choose(CC)?).to_string()));
    }
    if u.ratio(1, 4)? {
        // Envoy's codecs refuse control characters in a header value, so none arrive.
        let vary = text(u, &["Accept", "*", ",", "X-Client"], 3)?;
        headers.push(("vary".into(), vary.replace(char::is_control, "")));
    }
    if u.ratio(1, 4)? {
        let ct = *u.choose(&[
            "application/json",
            "text/html",
            "application/json; charset=x",
            "",
        ])?;
        headers.push(("content-type".into(), ct.into()));
    }
    let body = match u.int_in_range(0..=3u8)? {
        0 | 1 => {
            let mut v = json!({"id": 2, "name": "Bob", "email": "b@x", "company_id": 7,
                               "items": [{"id": 1, "total": 3.5, "currency": "EUR", "status": "new"}]});
            mutate(u, &mut v, 4, KEYS, VALUES)?;
            v.to_string().into_bytes()
        }
        2 => random_json(u, 3, KEYS, VALUES)?.to_string().into_bytes(),
        _ => u.arbitrary::<Vec<u8>>()?,
    };
    Ok(CallResponse { headers, body })
}

/// One composite request, its calls answered by hostile backends.
pub fn request(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = check(&mut u);
}

fn check(u: &mut Unstructured<'_>) -> Result<()> {
    let Some(cfg) = config() else {
        return Ok(());
    };
    let mut root = AggregateRoot::new(1);
    let mut vm = MemHost::new();
    if let Err(e) = root.configure(&mut vm, cfg.as_bytes()) {
        unreachable!("the target's configuration is refused: {e}");
    }
    let personal = u.arbitrary::<bool>()?;
    let path = if personal {
        "/api/dashboard".to_string()
    } else {
        format!("/api/dashboard/{}", text(u, VALUES, 3)?)
    };
    let mut headers = vec![(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )];
    let consumer = text(u, VALUES, 2)?;
    if u.ratio(4, 5)? {
        headers.push(("x-tollgate-consumer", consumer.as_str()));
    }
    if u.arbitrary()? {
        headers.push(("x-client", "mobile"));
    }
    let method = *u.choose(&["GET", "GET", "HEAD", "POST"])?;
    let mut req = vm.next_request(method, &path, &headers);
    let mut f = root.create_filter(2);
    let mut d = f.on_request_headers(&mut req, true);
    let mut answered = HashSet::new();
    for _ in 0..8 {
        if d != Decision::Pause {
            break;
        }
        let Some(call) = next_unanswered(&req.calls, &mut answered) else {
            break;
        };
        d = f.on_call_response(&mut req, call.token, answer(u)?);
    }
    // Every call stays on its templated path.
    for call in &req.calls {
        let p = call.header(":path").unwrap_or_default();
        let path_part = p.split('?').next().unwrap_or_default();
        assert!(
            p.starts_with('/') && !path_part.split('/').any(|s| s == "." || s == ".."),
            "a call left its path: {p:?} (request {path:?}, consumer {consumer:?})"
        );
        assert!(
            !p.contains('#') && !p.chars().any(char::is_control),
            "{p:?}"
        );
    }
    let Decision::Respond(r) = d else {
        return Ok(());
    };
    assert!(
        r.status == 200 || (400..600).contains(&r.status),
        "status {}",
        r.status
    );
    for (k, v) in &r.headers {
        assert!(
            !k.is_empty() && !v.chars().any(char::is_control),
            "{k}: {v:?}"
        );
    }
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct == "application/json" || ct == "application/problem+json",
        "content-type {ct:?}"
    );
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    assert!(
        body.is_object(),
        "a reply that is not a JSON object: {:?}",
        r.body
    );
    if personal {
        let cc = r.header("cache-control").unwrap_or("no-store");
        assert!(
            cc == "no-store" || cc.starts_with("private"),
            "a reply built from the caller's identity is `{cc}`"
        );
    }
    if ct == "application/problem+json" {
        assert_eq!(
            body.get("status").and_then(Value::as_u64),
            Some(u64::from(r.status))
        );
    }
    Ok(())
}
