//! A real `sdxld serve` process on loopback, for the service tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sdxld::proto::v1 as pb;
use sdxld::proto::v1::generation_service_client::GenerationServiceClient;
use sdxld::proto::v1::model_service_client::ModelServiceClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A running server; killed when dropped.
pub struct TestServer {
    /// The process.
    pub child: Child,
    /// host:port of the gRPC server.
    pub addr: String,
    /// host:port of the metrics endpoint.
    pub metrics_addr: Option<String>,
    /// host:port of the plaintext health endpoint, when one is configured.
    pub health_addr: Option<String>,
}

impl TestServer {
    /// [`Self::start`] serving the fixture pipelines: tiny2's by default, every pipeline
    /// of the fixtures by name as a base or a refiner, and `extra` settings.
    #[allow(dead_code)]
    pub async fn with_pipelines(extra: &[(&str, &str)]) -> Self {
        let pipelines = super::fixtures();
        let default = pipelines.join("tiny2/pipeline");
        let roots = pipelines.to_str().expect("utf-8");
        let mut env = vec![
            (
                "SDXLD__ENGINE__DEFAULT_MODEL",
                default.to_str().expect("utf-8"),
            ),
            ("SDXLD__MODELS__BASE_ROOTS", roots),
            ("SDXLD__MODELS__REFINER_ROOTS", roots),
        ];
        env.extend_from_slice(extra);
        Self::start(&env).await
    }

    /// [`Self::with_pipelines`] with the ControlNet fixtures as the ControlNet root.
    #[allow(dead_code)]
    pub async fn with_pipelines_and_controlnets() -> Self {
        let controlnets = super::controlnet_fixtures();
        let roots = controlnets.to_str().expect("utf-8");
        Self::with_pipelines(&[("SDXLD__MODELS__CONTROLNET_ROOTS", roots)]).await
    }

    /// [`Self::start`] serving tiny2's pipeline with `detectors` as the preprocessor root,
    /// `controlnets` as the ControlNet root, and `extra` settings.
    #[allow(dead_code)]
    pub async fn with_detectors(
        detectors: &std::path::Path,
        controlnets: &std::path::Path,
        extra: &[(&str, &str)],
    ) -> Self {
        let pipeline = super::fixtures().join("tiny2/pipeline");
        let mut env = vec![
            (
                "SDXLD__ENGINE__DEFAULT_MODEL",
                pipeline.to_str().expect("utf-8"),
            ),
            (
                "SDXLD__MODELS__PREPROCESSOR_ROOTS",
                detectors.to_str().expect("utf-8"),
            ),
            (
                "SDXLD__MODELS__CONTROLNET_ROOTS",
                controlnets.to_str().expect("utf-8"),
            ),
        ];
        env.extend_from_slice(extra);
        Self::start(&env).await
    }

    /// Starts `sdxld serve` on 127.0.0.1:0 with extra `SDXLD__*` settings and waits until
    /// it is ready.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdxld"));
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .env("SDXLD__SERVER__METRICS_LISTEN", "127.0.0.1:0")
            .env("SDXLD__ENGINE__DEVICE", "cpu")
            .env("SDXLD__SERVER__SHUTDOWN_GRACE_SECONDS", "20")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sdxld serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let mut metrics_addr = None;
        let mut health_addr = None;
        let start = Instant::now();
        while addr.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(120).saturating_sub(start.elapsed()))
                .expect("the server did not start");
            if let Some(a) = line.strip_prefix("sdxld listening on ") {
                addr = Some(a.trim().to_string());
            }
            if let Some(m) = line.strip_prefix("sdxld metrics on http://") {
                metrics_addr = Some(m.trim_end_matches("/metrics").to_string());
            }
            if let Some(h) = line.strip_prefix("sdxld health on ") {
                health_addr = Some(h.trim().to_string());
            }
        }
        let server = Self {
            child,
            addr: addr.unwrap_or_default(),
            metrics_addr,
            health_addr,
        };
        server.wait_ready().await;
        server
    }

    /// A channel to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// A generation client.
    pub async fn generation(&self) -> GenerationServiceClient<Channel> {
        GenerationServiceClient::new(self.channel().await).max_decoding_message_size(256 << 20)
    }

    /// A models client.
    pub async fn models(&self) -> ModelServiceClient<Channel> {
        ModelServiceClient::new(self.channel().await)
    }

    /// `spec` (one 64-pixel-wide tiny2 image) with the tiny2 refiner as ensemble of
    /// experts, and with a hires pass of scale 1.5: both complete, the second 96 wide.
    #[allow(dead_code)]
    pub async fn assert_refiner_and_hires_pass_run(&self, spec: pb::GenerationSpec) {
        let refined = pb::GenerationSpec {
            refiner: Some(pb::RefinerStage {
                model: "tiny2/refiner".into(),
                mode: pb::RefinerMode::EnsembleOfExperts as i32,
                high_noise_fraction: Some(0.5),
                ..Default::default()
            }),
            ..spec.clone()
        };
        let done = self.images(refined).await.expect("refiner");
        assert_eq!(done.images.len(), 1);
        let hires = pb::GenerationSpec {
            hires: Some(pb::HiresPass {
                scale: Some(1.5),
                ..Default::default()
            }),
            ..spec
        };
        let done = self.images(hires).await.expect("hires");
        assert_eq!(done.images[0].width, 96);
    }

    /// A GenerateImages call of `spec`, on a connection of its own.
    #[allow(dead_code)]
    pub async fn images(
        &self,
        spec: pb::GenerationSpec,
    ) -> Result<pb::GenerateImagesResponse, tonic::Status> {
        self.generation()
            .await
            .generate_images(pb::GenerateImagesRequest { spec: Some(spec) })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Asserts that `spec` is refused before admission as INVALID_ARGUMENT naming exactly
    /// `fields` (in any order); `what` names the case in failures.
    #[allow(dead_code)]
    pub async fn assert_invalid(&self, what: &str, spec: pb::GenerationSpec, fields: &[&str]) {
        let status = self.images(spec).await.expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        let mut got = violated_fields(&status);
        got.sort();
        let mut expected: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        expected.sort();
        assert_eq!(got, expected, "{what}");
    }

    /// Asserts that `with` (a feature on) writes `entry` into its first PNG's parameters
    /// and that its first image differs from `without`'s (the feature off) by more than 10
    /// levels somewhere; `what` names the feature in failures.
    #[allow(dead_code)]
    pub async fn assert_entry_and_effect(
        &self,
        what: &str,
        with: pb::GenerationSpec,
        without: pb::GenerationSpec,
        entry: &str,
    ) {
        let with = self.images(with).await.expect(what).images;
        let parameters = super::png_parameters(&with[0].data);
        assert!(parameters.contains(entry), "{what}: {parameters}");
        let without = self.images(without).await.expect(what).images;
        let moved = super::image_difference(
            &super::decoded_image(&with[0].data),
            &super::decoded_image(&without[0].data),
        );
        assert!(moved > 10, "{what} moves the image by {moved} levels only");
    }

    /// Runs `spec` as PNG images and as latents and asserts that they match the fixture
    /// case `key` of `reference` (`<key>.images` within two levels, `<key>.latents` within
    /// 1e-3).
    #[allow(dead_code)]
    pub async fn assert_matches_case(
        &self,
        name: &str,
        spec: pb::GenerationSpec,
        reference: &std::collections::HashMap<String, tch::Tensor>,
        key: &str,
    ) {
        let done = self
            .images(super::with_format(spec.clone(), pb::ImageFormat::Png))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let images = &reference[&format!("{key}.images")];
        assert_eq!(done.images.len() as i64, images.size()[0], "{name}: images");
        for (i, image) in done.images.iter().enumerate() {
            let got = super::decoded_image(&image.data);
            super::assert_images_match(&format!("{name} image {i}"), &got, &images.get(i as i64));
        }
        let latents = self
            .images(super::with_format(
                spec,
                pb::ImageFormat::LatentsSafetensors,
            ))
            .await
            .unwrap_or_else(|e| panic!("{name} latents: {e:?}"));
        let expected = &reference[&format!("{key}.latents")];
        for (i, image) in latents.images.iter().enumerate() {
            let got = super::latents_of(image);
            super::assert_close(
                &format!("{name} latents {i}"),
                &got.get(0),
                &expected.get(i as i64),
            );
        }
    }

    /// A Generate stream of `request` to its end: its events and its final status (Ok
    /// when it completed).
    #[allow(dead_code)]
    pub async fn stream(
        &self,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> (Vec<pb::generate_response::Event>, Result<(), tonic::Status>) {
        let started = self.generation().await.generate(request).await;
        let (messages, end) = drain(started).await;
        (messages.into_iter().filter_map(|m| m.event).collect(), end)
    }

    /// A Generate of `spec` that is either refused before its stream starts (the
    /// BadRequest's fields and descriptions) or runs to completion (`Ok`); a job admitted
    /// and then failed panics, naming `what`.
    #[allow(dead_code)]
    pub async fn refused_or_completed(
        &self,
        what: &str,
        spec: pb::GenerationSpec,
    ) -> Result<(), Vec<(String, String)>> {
        use tonic_types::StatusExt;
        let request = tonic::Request::new(pb::GenerateRequest { spec: Some(spec) });
        match self.stream(request).await {
            (_, Ok(())) => Ok(()),
            (events, Err(status)) => {
                assert!(events.is_empty(), "{what}: admitted, then {status:?}");
                assert_eq!(
                    status.code(),
                    tonic::Code::InvalidArgument,
                    "{what}: {status:?}"
                );
                let violations = status
                    .get_details_bad_request()
                    .unwrap_or_else(|| panic!("{what}: no BadRequest in {status:?}"))
                    .field_violations;
                Err(violations
                    .into_iter()
                    .map(|v| (v.field, v.description))
                    .collect())
            }
        }
    }

    /// Runs each case: every one either completes or is refused before admission naming
    /// `field` alone; at least one of each happens.
    #[allow(dead_code)]
    pub async fn completed_or_refused_naming(
        &self,
        field: &str,
        cases: Vec<(String, pb::GenerationSpec)>,
    ) {
        let (mut ran, mut refused) = (0, 0);
        for (what, spec) in cases {
            match self.refused_or_completed(&what, spec).await {
                Ok(()) => ran += 1,
                Err(fields) => {
                    assert_eq!(fields.len(), 1, "{what}: {fields:?}");
                    assert_eq!(fields[0].0, field, "{what}");
                    refused += 1;
                }
            }
        }
        assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");
    }

    /// A Generate of `spec` on a connection of its own, admitted: the open stream, its
    /// accepted event taken.
    #[allow(dead_code)]
    pub async fn admitted(
        &self,
        spec: pb::GenerationSpec,
    ) -> tonic::Streaming<pb::GenerateResponse> {
        use tokio_stream::StreamExt;
        let mut stream = self
            .generation()
            .await
            .generate(pb::GenerateRequest { spec: Some(spec) })
            .await
            .expect("admitted")
            .into_inner();
        let _accepted = stream.next().await;
        stream
    }

    /// The models of `kind` the server lists.
    #[allow(dead_code)]
    pub async fn list_models(&self, kind: pb::ModelKind) -> Vec<pb::ModelInfo> {
        self.models()
            .await
            .list_models(pb::ListModelsRequest { kind: kind as i32 })
            .await
            .expect("list")
            .into_inner()
            .models
    }

    /// The Preprocess RPC's answer to `request`.
    #[allow(dead_code)]
    pub async fn preprocess(
        &self,
        request: pb::PreprocessRequest,
    ) -> Result<pb::PreprocessResponse, tonic::Status> {
        self.generation()
            .await
            .preprocess(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// The server's capabilities.
    #[allow(dead_code)]
    pub async fn capabilities(&self) -> pb::GetCapabilitiesResponse {
        self.models()
            .await
            .get_capabilities(pb::GetCapabilitiesRequest {})
            .await
            .expect("capabilities")
            .into_inner()
    }

    /// The capabilities' entry for the preprocessor `kind`.
    #[allow(dead_code)]
    pub async fn preprocessor_support(&self, kind: pb::Preprocessor) -> pb::PreprocessorSupport {
        self.capabilities()
            .await
            .preprocessor_support
            .into_iter()
            .find(|s| s.preprocessor == kind as i32)
            .unwrap_or_else(|| panic!("{kind:?} listed"))
    }

    /// Asserts that the capabilities list `field` as a supported feature.
    #[allow(dead_code)]
    pub async fn assert_feature(&self, field: &str) {
        let capabilities = self.capabilities().await;
        assert!(
            capabilities
                .features
                .iter()
                .any(|f| f.field == field && f.supported),
            "{field} is not listed as supported"
        );
    }

    /// Runs `spec`, sends its first PNG's `sdxld` spec back and asserts that it gives the
    /// same bytes; returns that spec.
    #[allow(dead_code)]
    pub async fn assert_replays(&self, what: &str, spec: pb::GenerationSpec) -> pb::GenerationSpec {
        let first = self.images(spec).await.expect(what);
        let png = &first.images[0].data;
        let replayed = super::png_spec(png);
        let again = self.images(replayed.clone()).await.expect(what);
        assert_eq!(&again.images[0].data, png, "{what}: the replay differs");
        replayed
    }

    /// Asserts that `spec` (guided, at most ten steps) under a guider whose interval holds
    /// none of its steps gives the images of `spec` unguided (guidance 1, no guider) within
    /// a level: outside a guider's interval the prompt's batch runs alone, with every input
    /// of the request (ControlNet units, adapters, image prompts, an inpainting UNet's
    /// mask) taken for it. (A level: inputs prepared once for a batch of both prompts, as
    /// a ControlNet's embedded maps, may round differently from a batch of one.)
    #[allow(dead_code)]
    pub async fn assert_unguided_outside_the_interval(&self, what: &str, spec: pb::GenerationSpec) {
        assert!(
            spec.steps <= 10,
            "{what}: int(0.9 s) = int(0.95 s) needs s <= 10"
        );
        let outside = pb::GenerationSpec {
            guider: Some(pb::Guider {
                kind: pb::GuiderKind::Cfg as i32,
                start: Some(0.9),
                stop: Some(0.95),
                ..Default::default()
            }),
            ..spec.clone()
        };
        let unguided = pb::GenerationSpec {
            guidance_scale: Some(1.0),
            guider: None,
            ..spec
        };
        let outside = self.images(outside).await.expect(what).images;
        let unguided = self.images(unguided).await.expect(what).images;
        assert_eq!(outside.len(), unguided.len(), "{what}: images");
        for (i, (a, b)) in outside.iter().zip(&unguided).enumerate() {
            let difference = super::image_difference(
                &super::decoded_image(&a.data),
                &super::decoded_image(&b.data),
            );
            assert!(
                difference <= 1,
                "{what} image {i}: differs by {difference} levels"
            );
        }
    }

    /// The health status of `service`.
    pub async fn health(&self, service: &str) -> ServingStatus {
        let mut client = HealthClient::new(self.channel().await);
        let response = client
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("health check");
        ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown)
    }

    /// Waits for readiness through the plaintext health endpoint when there is one (a TLS
    /// server's), else the gRPC address.
    async fn wait_ready(&self) {
        let start = Instant::now();
        let addr = self.health_addr.as_ref().unwrap_or(&self.addr);
        while start.elapsed() < Duration::from_secs(120) {
            if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
            {
                let mut client = HealthClient::new(channel);
                if let Ok(r) = client
                    .check(HealthCheckRequest {
                        service: "sdxld.v1.GenerationService".into(),
                    })
                    .await
                {
                    if r.into_inner().status == ServingStatus::Serving as i32 {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server did not become ready");
    }

    /// The value of the metric line that starts with `prefix` (0 when absent).
    #[allow(dead_code)]
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(prefix).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// The metrics text.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let Some(addr) = &self.metrics_addr else {
            return String::new();
        };
        let mut stream = std::net::TcpStream::connect(addr).expect("metrics connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small, quick request on the demo model.
pub fn quick_spec(seed: u64) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: "a red apple on a table".into(),
        width: 64,
        height: 64,
        steps: 2,
        seed: Some(seed),
        ..Default::default()
    }
}

/// A request that runs for a while (many steps), for cancel and deadline tests.
pub fn slow_spec(seed: u64) -> pb::GenerationSpec {
    pb::GenerationSpec {
        prompt: "a long job".into(),
        width: 256,
        height: 256,
        steps: 150,
        seed: Some(seed),
        ..Default::default()
    }
}

/// The ErrorInfo reason and metadata of a status.
#[allow(dead_code)]
pub fn error_reason(status: &tonic::Status) -> (String, std::collections::HashMap<String, String>) {
    use tonic_types::StatusExt;
    let info = status.get_details_error_info().expect("ErrorInfo");
    (info.reason, info.metadata)
}

/// The fields a status's BadRequest details name, in order.
#[allow(dead_code)]
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// Every message of a server stream (or the call's refusal), and how it ended.
#[allow(dead_code)]
pub async fn drain<M>(
    started: Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>,
) -> (Vec<M>, Result<(), tonic::Status>) {
    use tokio_stream::StreamExt;
    let mut stream = match started {
        Ok(r) => r.into_inner(),
        Err(status) => return (Vec::new(), Err(status)),
    };
    let mut messages = Vec::new();
    loop {
        match stream.next().await {
            Some(Ok(message)) => messages.push(message),
            Some(Err(status)) => return (messages, Err(status)),
            None => return (messages, Ok(())),
        }
    }
}
