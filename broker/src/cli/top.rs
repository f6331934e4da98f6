//! `memsock top`: a live terminal view of the broker's streams, in the
//! manner of pw-top — a row per stream with its subscribers beneath, rates,
//! slots, queues, lag and drops; a subscriber whose drops rose since the
//! last refresh highlighted. Names are what each client sent in its Hello,
//! not /proc's (which may belong to another pid namespace). When the broker
//! dies the header says so at the next refresh, and `top` reconnects when a
//! broker answers again.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use memsock::pattern::Pattern;
use memsock::{Client, LatencySummary, StatsReport, StreamReport, SubscriberReport};
use ratatui::Terminal;
use ratatui::backend::{Backend, TestBackend};
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Row, Table};

use super::stats::policy;

/// `memsock top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Only streams matching this pattern (`*` within a `/`-separated
    /// part, `**` across parts).
    #[arg(long)]
    stream: Option<String>,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Print one screen as plain text and exit (for scripts).
    #[arg(long)]
    once: bool,
}

/// What `top` knows: the last report, and what changed since the one
/// before.
struct Model {
    socket: PathBuf,
    pattern: Option<Pattern>,
    client: Option<Client>,
    report: Option<StatsReport>,
    /// The broker did not answer the last refresh: why, and since when.
    gone: Option<(String, Instant)>,
    /// Drops per subscription at the last refresh.
    drops: HashMap<u64, u64>,
    /// Subscriptions whose drops rose at the last refresh.
    rose: HashSet<u64>,
}

impl Model {
    fn new(socket: &Path, pattern: Option<Pattern>) -> Self {
        Self {
            socket: socket.to_owned(),
            pattern,
            client: None,
            report: None,
            gone: None,
            drops: HashMap::new(),
            rose: HashSet::new(),
        }
    }

    /// Asks the broker (connecting first if need be) for its stats.
    fn refresh(&mut self) {
        if self.client.is_none() {
            self.client = Client::connect_named(&self.socket, "memsock-top").ok();
        }
        let result = match &self.client {
            Some(client) => client.stats(None).map_err(|e| e.to_string()),
            None => Err(format!("no broker answers at {}", self.socket.display())),
        };
        match result {
            Ok(report) => self.update(report),
            Err(e) => {
                self.client = None;
                let since = self.gone.take().map_or_else(Instant::now, |(_, since)| since);
                self.gone = Some((e, since));
            }
        }
    }

    fn update(&mut self, mut report: StatsReport) {
        if let Some(p) = &self.pattern {
            report.streams.retain(|s| p.matches(&s.name));
        }
        let subscribers = || report.streams.iter().flat_map(|s| &s.subscribers);
        self.rose = subscribers()
            .filter(|u| self.drops.get(&u.subscription).is_some_and(|&before| u.dropped > before))
            .map(|u| u.subscription)
            .collect();
        self.drops = subscribers().map(|u| (u.subscription, u.dropped)).collect();
        self.report = Some(report);
        self.gone = None;
    }

    /// Draws the whole screen into `area` of `buf`.
    fn render(&self, area: Rect, buf: &mut Buffer) {
        use ratatui::widgets::Widget as _;
        let [header, table, footer] =
            Layout::vertical([Constraint::Length(2), Constraint::Min(0), Constraint::Length(1)]).areas(area);
        Paragraph::new(self.header()).render(header, buf);
        self.table().render(table, buf);
        let filter = self.pattern.as_ref().map(|p| format!("   filter: {p}")).unwrap_or_default();
        let keys = Line::from(vec![
            Span::styled(" q ", Style::new().add_modifier(Modifier::REVERSED)),
            Span::raw(format!(" quit{filter}")),
        ]);
        Paragraph::new(keys).render(footer, buf);
    }

    fn header(&self) -> Vec<Line<'static>> {
        let title = Span::styled("memsock top", Style::new().add_modifier(Modifier::BOLD));
        if let Some((why, since)) = &self.gone {
            let gone = format!(" — broker gone ({}s ago): {why}; reconnecting", since.elapsed().as_secs());
            return vec![Line::from(vec![title, Span::styled(gone, Style::new().fg(Color::Red))])];
        }
        let Some(r) = &self.report else { return vec![Line::from(vec![title, Span::raw(" — connecting")])] };
        let subscribers: usize = r.streams.iter().map(|s| s.subscribers.len()).sum();
        let line = format!(
            " — broker pid {}, up {}, {} clients, {} streams, {subscribers} subscribers, {} of {} descriptors",
            r.broker_pid,
            duration(r.uptime_ns),
            r.clients,
            r.streams.len(),
            r.descriptors,
            r.descriptor_limit
        );
        vec![Line::from(vec![title, Span::raw(line)])]
    }

    fn table(&self) -> Table<'static> {
        let heads = [
            "STREAM / SUBSCRIBER",
            "PID",
            "CLIENT",
            "POLICY",
            "FRAMES/S",
            "MB/S",
            "SLOTS",
            "CREDITS",
            "QUEUED",
            "LAG",
            "DROPS/S",
            "FAULTS",
            "P50",
            "P99",
            "MAX",
            "IDLE",
        ];
        let widths = [22, 7, 14, 11, 8, 8, 9, 7, 6, 8, 7, 6, 7, 7, 7, 6].map(Constraint::Length);
        let mut rows = Vec::new();
        let dim = self.gone.is_some();
        for s in self.report.iter().flat_map(|r| &r.streams) {
            rows.push(stream_row(s).style(if dim { Style::new().add_modifier(Modifier::DIM) } else { Style::new() }));
            let count = s.subscribers.len();
            for (i, u) in s.subscribers.iter().enumerate() {
                let mut style = Style::new();
                if self.rose.contains(&u.subscription) && !dim {
                    style = style.fg(Color::Red).add_modifier(Modifier::BOLD);
                }
                if dim {
                    style = style.add_modifier(Modifier::DIM);
                }
                rows.push(subscriber_row(u, i + 1 == count).style(style));
            }
        }
        Table::new(rows, widths)
            .header(Row::new(heads).style(Style::new().add_modifier(Modifier::REVERSED)))
            .column_spacing(1)
    }
}

fn stream_row(s: &StreamReport) -> Row<'static> {
    let name = if s.closed { format!("{} (closed)", s.name) } else { s.name.clone() };
    let (pid, client) = match s.publisher_pid {
        Some(pid) => (pid.to_string(), s.publisher_name.clone().unwrap_or_default()),
        None => ("-".into(), "(no publisher)".into()),
    };
    Row::new(vec![
        name,
        pid,
        client,
        String::new(),
        format!("{:.0}", s.msgs_per_s),
        format!("{:.2}", s.bytes_per_s / 1e6),
        format!("{}/{}", s.free_slots, s.slot_count),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        s.idle_ns.map_or("-".into(), duration),
    ])
}

fn subscriber_row(u: &SubscriberReport, last: bool) -> Row<'static> {
    Row::new(vec![
        format!(" {} #{}", if last { "└─" } else { "├─" }, u.index),
        u.pid.to_string(),
        u.client_name.clone(),
        policy(u.policy),
        format!("{:.0}", u.msgs_per_s),
        String::new(),
        String::new(),
        u.credits.to_string(),
        u.queued.to_string(),
        short(u.lag_ns),
        format!("{:.0}", u.dropped_per_s),
        u.faults.to_string(),
        latency(u, |l| l.p50_ns),
        latency(u, |l| l.p99_ns),
        latency(u, |l| l.max_ns),
        String::new(),
    ])
}

/// A latency figure of the last interval, "-" if none was measured.
fn latency(u: &SubscriberReport, figure: fn(&LatencySummary) -> u64) -> String {
    u.latency.as_ref().and_then(|l| l.last_interval.as_ref()).map_or("-".into(), |l| short(figure(l)))
}

/// A duration as people read it: 3h04m, 5m07s, 12s, 340ms.
fn duration(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0 => format!("{}ms", ns / 1_000_000),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// A short latency or lag: 0, 850ns, 12µs, 3.4ms, 1.2s.
fn short(ns: u64) -> String {
    match ns {
        0 => "0".into(),
        1..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{}µs", ns / 1_000),
        1_000_000..10_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        10_000_000..1_000_000_000 => format!("{}ms", ns / 1_000_000),
        _ => format!("{:.1}s", ns as f64 / 1e9),
    }
}

/// The screen as plain text, `width` columns wide, trailing blanks cut.
fn plain_text(model: &Model, width: u16) -> Result<String> {
    let rows = model.report.iter().flat_map(|r| &r.streams).map(|s| 1 + s.subscribers.len()).sum::<usize>();
    let height = u16::try_from(rows + 4).unwrap_or(u16::MAX);
    let mut terminal = Terminal::new(TestBackend::new(width, height))?;
    terminal.draw(|f| model.render(f.area(), f.buffer_mut()))?;
    let buffer = terminal.backend().buffer();
    let mut text = String::new();
    for y in 0..buffer.area.height {
        let line: String = (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect();
        text.push_str(line.trim_end());
        text.push('\n');
    }
    Ok(text)
}

/// Runs the live view until `q`, or prints one screen with `--once`.
pub fn run(socket: &Path, args: &TopArgs) -> Result<()> {
    anyhow::ensure!(args.interval > 0.0, "--interval must be positive");
    let pattern =
        args.stream.as_deref().map(|p| Pattern::parse(p).with_context(|| format!("--stream {p:?}"))).transpose()?;
    let mut model = Model::new(socket, pattern);
    model.refresh();
    if args.once {
        if let Some((why, _)) = &model.gone {
            anyhow::bail!("{why}");
        }
        // Rates need two looks a second apart: the broker's own sampling.
        print!("{}", plain_text(&model, 160)?);
        std::io::stdout().flush()?;
        return Ok(());
    }
    let mut terminal = ratatui::init();
    let result = live(&mut terminal, &mut model, Duration::from_secs_f64(args.interval));
    ratatui::restore();
    result
}

fn live<B: Backend>(terminal: &mut Terminal<B>, model: &mut Model, interval: Duration) -> Result<()> {
    let mut next = Instant::now() + interval;
    loop {
        terminal.draw(|f| model.render(f.area(), f.buffer_mut()))?;
        // Keys until the next refresh.
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            if !event::poll(wait)? {
                break;
            }
            if let Event::Key(key) = event::read()? {
                let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
                if key.kind == KeyEventKind::Press && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                {
                    return Ok(());
                }
            }
        }
        next += interval;
        model.refresh();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memsock::OverflowPolicy;

    fn subscriber(subscription: u64, index: u32, name: &str, policy: OverflowPolicy) -> SubscriberReport {
        SubscriberReport {
            subscription,
            index,
            attach_seq: 0,
            pid: 4000 + index,
            client_name: name.into(),
            policy,
            credits: 16,
            delivered: 1000,
            dropped: 0,
            evicted: 0,
            queued: 0,
            lag_ns: 0,
            msgs_per_s: 1000.0,
            dropped_per_s: 0.0,
            faults: 0,
            latency: None,
        }
    }

    /// A known report: two streams (one without a publisher), three
    /// subscribers, one of which dropped frames since the last refresh.
    fn report(dropped: u64) -> StatsReport {
        let mut recorder = subscriber(7, 0, "memsock-record", OverflowPolicy::Lossless);
        recorder.queued = 12;
        recorder.lag_ns = 3_400_000;
        let last_interval = LatencySummary { samples: 1000, p50_ns: 12_288, p99_ns: 3_670_016, max_ns: 4_194_304 };
        recorder.latency =
            Some(memsock::LatencyReport { last_interval: Some(last_interval), buckets: vec![(29, 1000)], sum_ns: 1 });
        let mut viewer = subscriber(9, 1, "viewer.py", OverflowPolicy::KeepLatest);
        viewer.dropped = dropped;
        viewer.evicted = dropped;
        viewer.dropped_per_s = 250.0;
        viewer.msgs_per_s = 750.0;
        let camera = StreamReport {
            name: "camera/front".into(),
            publisher_pid: Some(3001),
            publisher_name: Some("grabber".into()),
            slot_size: 1 << 20,
            slot_count: 32,
            free_slots: 17,
            published: 123_456,
            bytes: 123_456 << 20,
            msgs_per_s: 1000.0,
            bytes_per_s: 1000.0 * 1048576.0,
            idle_ns: Some(0),
            closed: false,
            history: 0,
            history_held: 0,
            retained_ns: None,
            subscribers: vec![recorder, viewer],
        };
        let imu = StreamReport {
            name: "imu".into(),
            publisher_pid: None,
            publisher_name: None,
            slot_size: 64,
            slot_count: 1024,
            free_slots: 1023,
            published: 10,
            bytes: 640,
            msgs_per_s: 0.0,
            bytes_per_s: 0.0,
            idle_ns: Some(75_000_000_000),
            closed: false,
            history: 0,
            history_held: 0,
            retained_ns: None,
            subscribers: vec![subscriber(11, 0, "logger", OverflowPolicy::DropNewest)],
        };
        StatsReport {
            broker_pid: 3000,
            uptime_ns: 3_725_000_000_000,
            clients: 5,
            waiting_subscribers: 0,
            descriptors: 21,
            descriptor_limit: 20000,
            streams: vec![camera, imu],
        }
    }

    /// The screen of a known report, as checked in (`top_screen.txt`;
    /// MEMSOCK_BLESS=1 rewrites it), and the viewer's row highlighted
    /// because its drops rose.
    #[test]
    fn a_known_report_renders_the_checked_in_screen() {
        let mut model = Model::new(Path::new("/nonexistent"), None);
        model.update(report(100));
        model.update(report(350));
        let text = plain_text(&model, 160).unwrap();
        let expected_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cli/top_screen.txt");
        if std::env::var_os("MEMSOCK_BLESS").is_some() {
            std::fs::write(&expected_path, &text).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap();
        assert_eq!(text, expected, "the screen changed:\n{text}");

        let mut terminal = Terminal::new(TestBackend::new(160, 10)).unwrap();
        terminal.draw(|f| model.render(f.area(), f.buffer_mut())).unwrap();
        let buffer = terminal.backend().buffer();
        let row_of = |needle: &str| {
            (0..buffer.area.height).find(|&y| {
                let line: String = (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect();
                line.contains(needle)
            })
        };
        let viewer = row_of("viewer.py").unwrap();
        let recorder = row_of("memsock-record").unwrap();
        assert_eq!(buffer[(2, viewer)].fg, Color::Red);
        assert_ne!(buffer[(2, recorder)].fg, Color::Red);
    }

    #[test]
    fn a_pattern_filters_streams_and_a_dead_broker_is_named() {
        let mut model = Model::new(Path::new("/nonexistent/broker.sock"), Some(Pattern::parse("camera/*").unwrap()));
        model.update(report(0));
        let text = plain_text(&model, 160).unwrap();
        assert!(text.contains("camera/front") && !text.contains("imu"), "{text}");
        assert!(text.contains("filter: camera/*"), "{text}");
        model.refresh();
        let text = plain_text(&model, 160).unwrap();
        assert!(text.contains("broker gone"), "{text}");
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(duration(340_000_000), "340ms");
        assert_eq!(duration(12_000_000_000), "12s");
        assert_eq!(duration(307_000_000_000), "5m07s");
        assert_eq!(duration(11_040_000_000_000), "3h04m");
        assert_eq!(short(850), "850ns");
        assert_eq!(short(3_400_000), "3.4ms");
    }
}
