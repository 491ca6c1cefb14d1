//! The service on real processes: a `redis-server` on a free port, `tollgate-rls` (the built
//! binary), and gRPC calls as Envoy makes them. Needs `redis-server` on PATH (`make redis`
//! installs it).

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use tollgate_rls_proto::{
        Code, Entry, RateLimitDescriptor, RateLimitRequest, RateLimitResponse,
    };
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::transport::{Channel, Endpoint};

    /// A child process killed when dropped.
    struct Proc(Child);

    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Wait until `port` accepts connections (at most 20 s), or panic with `what`.
    fn wait_port(port: u16, what: &str, child: &mut Child) {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{what} exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{what} did not listen on {port}");
    }

    fn redis(port: u16) -> Proc {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: install it with `make redis` (apt-get install redis-server)",
            );
        wait_port(port, "redis-server", &mut child);
        Proc(child)
    }

    fn limits_file(dir: &str, text: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("tollgate-rls-test-{}-{dir}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("limits.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn server(limits: &std::path::Path, redis_port: u16) -> (Proc, u16) {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate-rls"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--limits", limits.to_str().unwrap()])
            .args(["--redis", &format!("redis://127.0.0.1:{redis_port}")])
            .args(["--timeout-ms", "2000"])
            .spawn()
            .unwrap();
        wait_port(port, "tollgate-rls", &mut child);
        (Proc(child), port)
    }

    async fn client(port: u16) -> tonic::client::Grpc<Channel> {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        tonic::client::Grpc::new(channel)
    }

    async fn call(
        grpc: &mut tonic::client::Grpc<Channel>,
        req: RateLimitRequest,
    ) -> Result<RateLimitResponse, tonic::Status> {
        grpc.ready().await.unwrap();
        let path = PathAndQuery::from_static(
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        );
        grpc.unary(
            tonic::Request::new(req),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .map(|r| r.into_inner())
    }

    fn request(consumer: &str, hits: u32) -> RateLimitRequest {
        RateLimitRequest {
            domain: "tollgate".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    Entry {
                        key: "limit".into(),
                        value: "global-api".into(),
                    },
                    Entry {
                        key: "consumer".into(),
                        value: consumer.into(),
                    },
                ],
            }],
            hits_addend: hits,
        }
    }

    const LIMITS: &str = "
    - namespace: tollgate
      name: global-api
      max_value: 10
      seconds: 60
      conditions: [\"descriptors[0].limit == 'global-api'\"]
      variables: [\"descriptors[0].consumer\"]
    ";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn limits_exactly_across_two_servers_and_survives_a_redis_restart() {
        let redis_port = free_port();
        let mut redis_proc = redis(redis_port);
        let limits = limits_file("a", LIMITS);
        let (_s1, p1) = server(&limits, redis_port);
        let (_s2, p2) = server(&limits, redis_port);
        let mut c1 = client(p1).await;
        let mut c2 = client(p2).await;

        // One call answers with the limit, the units left and the time to reset.
        let r = call(&mut c1, request("alice", 3)).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        let st = &r.statuses[0];
        assert_eq!(st.limit_remaining, 7);
        assert_eq!(st.current_limit.as_ref().unwrap().requests_per_unit, 10);
        let reset = st.duration_until_reset.unwrap().as_millis_ceil();
        assert!(reset > 0 && reset <= 60_000, "{reset}");

        // 40 concurrent calls of 1 unit, half to each server, for 7 units left: exactly 7 admitted.
        let mut tasks = Vec::new();
        for i in 0..40 {
            let mut c = if i % 2 == 0 { c1.clone() } else { c2.clone() };
            tasks.push(tokio::spawn(async move {
                call(&mut c, request("alice", 1))
                    .await
                    .unwrap()
                    .overall_code
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap() == Code::Ok as i32 {
                ok += 1;
            }
        }
        assert_eq!(ok, 7);
        let r = call(&mut c2, request("alice", 1)).await.unwrap();
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        assert_eq!(r.statuses[0].limit_remaining, 0);
        // Another consumer has its own counter; a descriptor no limit matches is OK.
        let r = call(&mut c2, request("bob", 10)).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        let mut other = request("bob", 1);
        other.descriptors[0].entries[0].value = "no-such-limit".into();
        let r = call(&mut c2, other).await.unwrap();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert!(r.statuses[0].current_limit.is_none());

        // Redis stops: UNAVAILABLE.
        drop(redis_proc);
        let err = call(&mut c1, request("carol", 1)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        // After a few failures in a row the service fails fast ("storage down": answered
        // without waiting for Redis), but for one probe per interval.
        let mut messages = vec![err.message().to_string()];
        while messages.len() < 20 && messages.last().map(String::as_str) != Some("storage down") {
            let err = call(&mut c1, request("carol", 1)).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unavailable);
            messages.push(err.message().to_string());
        }
        assert_eq!(
            messages.last().map(String::as_str),
            Some("storage down"),
            "{messages:?}"
        );

        // Redis is back (empty: a fresh window): answers again after the reconnect.
        redis_proc = redis(redis_port);
        let mut answered = None;
        for _ in 0..50 {
            match call(&mut c1, request("carol", 1)).await {
                Ok(r) => {
                    answered = Some(r);
                    break;
                }
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::Unavailable);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let r = answered.expect("the service answers again once Redis is back");
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, 9);
        drop(redis_proc);
    }
}
