//! Logs and traces. Logs go to stderr, as text or JSON, at the level of `RUST_LOG`. When the server
//! config's `[telemetry]` names an OTLP endpoint, the job and step spans are also exported to that
//! collector over OTLP/gRPC, filtered on their own: one trace per job, its steps as child spans.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use crate::model::TelemetrySettings;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing::subscriber::Interest;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The field that marks the callsites of job and step spans not sampled for export
/// (`[telemetry] sample_ratio`): the OTLP layer skips them, the log layer does not. Sampling when
/// the job starts, rather than in the OpenTelemetry SDK, spares unsampled jobs the cost of
/// building spans that would be dropped, which is most of the cost of tracing.
pub const UNTRACED: &str = "untraced";

/// Spans per export. The processor exports one batch at a time; the SDK's 512 made each request
/// too small to keep up with a few thousand jobs a second, and spans were dropped. 4,096 spans
/// are about a megabyte, a quarter of gRPC's default message limit.
const EXPORT_BATCH: usize = 4096;

tokio::task_local! {
    /// Set while a step of a job not sampled for export runs: spans its agent opens (an HTTP
    /// client's, say) are not exported either, instead of becoming traces of their own.
    static UNSAMPLED: ();
}

/// Run a step of a job not sampled for export (see [`UNSAMPLED`]).
pub(crate) fn unsampled<F: Future>(step: F) -> impl Future<Output = F::Output> {
    UNSAMPLED.scope((), step)
}

/// The OTLP layer's sampling filter: no span of a job not sampled for export, whether it comes
/// from the engine's own callsites (marked [`UNTRACED`]), from inside such a job's step, or opens
/// directly under such a span.
struct Sampled;

impl<S: tracing::Subscriber> tracing_subscriber::layer::Filter<S> for Sampled {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let untraced = |m: &tracing::Metadata<'_>| m.fields().field(UNTRACED).is_some();
        !untraced(meta)
            && UNSAMPLED.try_with(|_| ()).is_err()
            && !cx.current_span().metadata().is_some_and(untraced)
    }

    fn callsite_enabled(&self, meta: &'static tracing::Metadata<'static>) -> Interest {
        if meta.fields().field(UNTRACED).is_some() {
            Interest::never()
        } else {
            // Decided per span: it depends on the job the span opens in.
            Interest::sometimes()
        }
    }
}

/// Never exported unless `[telemetry] filter` names them: the export's own transport (tracing it
/// would feed the export back into itself), and ractor's per-actor spans, which live as long as
/// the server and belong to no job.
const UNEXPORTED_TARGETS: &[&str] = &[
    "ractor",
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
];

/// The OTLP layer's target filter: `[telemetry] filter`, with [`UNEXPORTED_TARGETS`] off unless
/// it names them.
fn export_filter(spec: &str) -> Result<EnvFilter, TelemetryError> {
    let mut filter = EnvFilter::builder()
        .parse(spec)
        .map_err(|e| TelemetryError::Config(format!("filter: {e}")))?;
    for target in UNEXPORTED_TARGETS {
        if !spec.contains(target) {
            filter =
                filter.add_directive(format!("{target}=off").parse().expect("a valid directive"));
        }
    }
    Ok(filter)
}

/// Whether this process exports traces; spans carry fields only an export reads while it does.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether an OTLP export is installed: the job's outcome is recorded on its span only then, as
/// a log line never shows it and recording it costs a reallocation per job.
pub fn exporting() -> bool {
    EXPORTING.load(Relaxed)
}

/// Spans waiting for export. The SDK's default (2,048) drops spans from a server finishing a few
/// thousand jobs a second between two exports; 64 Ki spans hold ten seconds of that.
const EXPORT_QUEUE: usize = 65_536;

/// Why the log and trace pipeline could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("[telemetry] {0}")]
    Config(String),
    #[error("[telemetry] otlp_endpoint {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("a log subscriber is already installed in this process")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// The installed pipeline; [`shutdown`](Self::shutdown) sends what is still queued.
#[must_use = "shut the telemetry down to send the last spans"]
pub struct Telemetry {
    provider: Option<(SdkTracerProvider, std::time::Duration)>,
}

impl Telemetry {
    /// Export the spans still queued, waiting at most the export timeout (a collector that is
    /// gone must not hold a stopping server). Call it outside the async code but while the Tokio
    /// runtime is alive: the gRPC channel runs on that runtime.
    pub fn shutdown(self) {
        if let Some((provider, timeout)) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(timeout)
        {
            eprintln!("warning: trace export did not finish: {e}");
        }
    }
}

/// Standard error through the process's redactor: every log line is scrubbed of the secret
/// values in use before it is written (the formatter writes a whole event at once, so a value
/// is never split across writes).
struct RedactingStderr;

impl std::io::Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        match cascade_agents::secret::redactor().redact(&text) {
            std::borrow::Cow::Borrowed(_) => std::io::stderr().write_all(buf)?,
            std::borrow::Cow::Owned(clean) => std::io::stderr().write_all(clean.as_bytes())?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Install the global subscriber: the log layer, plus the OTLP layer when `otlp` has an endpoint.
/// With an endpoint it must run inside a Tokio runtime, which the exporter's channel lives on.
pub fn init(json: bool, otlp: Option<&TelemetrySettings>) -> Result<Telemetry, TelemetryError> {
    let log_filter = log_filter();
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(|| RedactingStderr)
            .with_filter(log_filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(|| RedactingStderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(log_filter)
            .boxed()
    };
    let (traces, provider) = match otlp {
        Some(
            settings @ TelemetrySettings {
                otlp_endpoint: Some(endpoint),
                ..
            },
        ) => {
            let provider = tracer_provider(settings, endpoint)?;
            // The filter was checked when the config was loaded.
            let filter = export_filter(&settings.filter)?.and(Sampled);
            // A span carries its own fields, nothing more: source locations, thread, target
            // and busy/idle times cost a copy of a path or a clock read per span, and made
            // exporting every span three times as costly. Whoever needs the OpenTelemetry
            // context reads it from the span (OpenTelemetrySpanExt), so entering a span does
            // not activate it.
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("cascade"))
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_context_activation(false)
                .with_filter(filter)
                .boxed();
            (Some(layer), Some((provider, settings.timeout)))
        }
        _ => (None, None),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()?;
    EXPORTING.store(provider.is_some(), Relaxed);
    Ok(Telemetry { provider })
}

/// `RUST_LOG`, default `warn`.
fn log_filter() -> EnvFilter {
    let spec = std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_default();
    let (filter, warning) = log_filter_from(&spec);
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    filter
}

/// The log filter for a `RUST_LOG` value, and a warning when it is not a valid filter. ractor
/// wraps every actor in an INFO span entered on each message: noise to an operator and a cost per
/// message, so it stays at `warn` unless the value names ractor.
fn log_filter_from(spec: &str) -> (EnvFilter, Option<String>) {
    let (filter, warning) = if spec.trim().is_empty() {
        (EnvFilter::new("warn"), None)
    } else {
        match EnvFilter::try_new(spec) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new("warn"),
                Some(format!(
                    "RUST_LOG={spec:?} is not a valid filter ({e}); logging at warn"
                )),
            ),
        }
    };
    if spec.contains("ractor") {
        (filter, warning)
    } else {
        let quiet = "ractor=warn".parse().expect("a valid directive");
        (filter.add_directive(quiet), warning)
    }
}

/// The OTLP exporter behind the process's redactor: span and event attributes, event names and
/// error descriptions are scrubbed of the secret values in use before they leave.
#[derive(Debug)]
struct RedactingExporter<E>(E);

fn scrub_attributes(attributes: &mut [KeyValue]) {
    let r = cascade_agents::secret::redactor();
    for kv in attributes {
        if let opentelemetry::Value::String(s) = &kv.value
            && let std::borrow::Cow::Owned(clean) = r.redact(s.as_str())
        {
            kv.value = opentelemetry::Value::String(clean.into());
        }
    }
}

fn scrub_text(text: &mut std::borrow::Cow<'static, str>) {
    if let std::borrow::Cow::Owned(clean) = cascade_agents::secret::redactor().redact(text) {
        *text = clean.into();
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for RedactingExporter<E>
{
    fn export(
        &self,
        mut batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        for span in &mut batch {
            scrub_attributes(&mut span.attributes);
            for event in span.events.events.iter_mut() {
                scrub_text(&mut event.name);
                scrub_attributes(&mut event.attributes);
            }
            if let opentelemetry::trace::Status::Error { description } = &mut span.status {
                scrub_text(description);
            }
        }
        self.0.export(batch)
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

fn tracer_provider(
    settings: &TelemetrySettings,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (name, secret) in &settings.headers {
        let value = secret
            .resolve()
            .map_err(|e| TelemetryError::Config(format!("headers.{name}: {e}")))?;
        let key = tonic::metadata::AsciiMetadataKey::from_bytes(name.as_bytes())
            .map_err(|_| TelemetryError::Config(format!("headers.{name}: not a metadata name")))?;
        // The value is not shown in the error: it is the credential.
        let mut value: tonic::metadata::AsciiMetadataValue = std::str::from_utf8(value.expose())
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                TelemetryError::Config(format!(
                    "headers.{name}: the secret is not a valid header value"
                ))
            })?;
        // Keeps it out of HTTP/2 header compression tables and debug output.
        value.set_sensitive(true);
        metadata.insert(key, value);
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(settings.timeout)
        .with_metadata(metadata);
    if endpoint.starts_with("https://") {
        exporter =
            exporter.with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots());
    }
    let exporter = exporter
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: endpoint.to_string(),
            source,
        })?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(EXPORT_QUEUE)
        .with_max_export_batch_size(EXPORT_BATCH)
        .build();
    let processor = BatchSpanProcessor::builder(RedactingExporter(exporter))
        .with_batch_config(batch)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        // Jobs are sampled when they start (see UNTRACED); what reaches the SDK is exported.
        .with_sampler(Sampler::AlwaysOn)
        .with_resource(
            Resource::builder()
                .with_service_name(settings.service_name.clone())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        )
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exporter that keeps what it is given.
    #[derive(Debug, Default)]
    struct Kept(std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>);

    impl opentelemetry_sdk::trace::SpanExporter for Kept {
        fn export(
            &self,
            batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send
        {
            self.0.lock().unwrap().extend(batch);
            std::future::ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn exported_spans_are_scrubbed_of_secret_values() {
        use cascade_agents::secret::{Redactor, redactor};
        use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status};
        let source = Redactor::source();
        redactor().register(source, vec!["sk-otlp-7c1e".into()]);
        let mut events = opentelemetry_sdk::trace::SpanEvents::default();
        events.events.push(opentelemetry::trace::Event::new(
            "refused sk-otlp-7c1e",
            std::time::SystemTime::now(),
            vec![KeyValue::new("body", "echo sk-otlp-7c1e")],
            0,
        ));
        let span = opentelemetry_sdk::trace::SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "step".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: vec![
                KeyValue::new("error", "upstream said Bearer sk-otlp-7c1e"),
                KeyValue::new("attempt", 2),
            ],
            dropped_attributes_count: 0,
            events,
            links: Default::default(),
            status: Status::error("key sk-otlp-7c1e refused"),
            instrumentation_scope: Default::default(),
        };
        let kept = Kept::default();
        let out = kept.0.clone();
        use opentelemetry_sdk::trace::SpanExporter as _;
        RedactingExporter(kept).export(vec![span]).await.unwrap();
        redactor().unregister(source);
        let spans = out.lock().unwrap();
        let text = format!("{:?}", spans[0]);
        assert!(!text.contains("sk-otlp-7c1e"), "{text}");
        assert_eq!(
            spans[0].attributes[0].value.as_str(),
            "upstream said Bearer [redacted]"
        );
        assert_eq!(spans[0].events.events[0].name, "refused [redacted]");
        assert_eq!(spans[0].status, Status::error("key [redacted] refused"));
    }

    #[test]
    fn log_filter_defaults_to_warn_and_quiets_ractor_unless_named() {
        let (f, w) = log_filter_from("");
        assert_eq!(f.to_string(), "ractor=warn,warn");
        assert!(w.is_none());
        let (f, _) = log_filter_from("info,cascade_orchestrator=debug");
        let directives = f.to_string();
        assert!(directives.contains("ractor=warn"), "{directives}");
        assert!(
            directives.contains("cascade_orchestrator=debug"),
            "{directives}"
        );
        let (f, _) = log_filter_from("ractor=trace");
        assert_eq!(f.to_string(), "ractor=trace");
        let (f, w) = log_filter_from("cascade=loud");
        assert_eq!(f.to_string(), "ractor=warn,warn");
        assert!(w.unwrap().contains("not a valid filter"));
    }
}
