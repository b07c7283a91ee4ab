//! How an image build shows its progress on stderr. On a terminal, one status line redrawn in
//! place: the image, the engine's current build step and the time so far. Elsewhere (a log, a
//! pipe, CI), plain lines: one when the build starts, one per step, one at the end. With `-v`,
//! every line of the engine's output instead. Time comes in as `Instant`s, so the rendering is
//! tested without waiting.

use std::io::Write;
use std::time::{Duration, Instant};

/// Which of the three ways to show a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A terminal: one status line, redrawn.
    Live,
    /// Not a terminal: a plain line per step.
    Lines,
    /// `-v`: every line of the engine's output.
    Verbose,
}

impl Mode {
    /// The mode for stderr: verbose wins, else live on a terminal, else plain lines.
    pub fn for_stderr(verbose: bool) -> Mode {
        if verbose {
            Mode::Verbose
        } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            Mode::Live
        } else {
            Mode::Lines
        }
    }
}

/// One image build being shown.
pub struct BuildProgress<W: Write> {
    out: W,
    mode: Mode,
    /// Columns of the terminal; the status line is cut to fit so it never wraps.
    width: usize,
    reference: String,
    started: Instant,
    /// The current step, as `step 3/9: RUN ...`.
    step: Option<String>,
    /// Whether a status line is on the screen (and must be cleared before any other output).
    drawn: bool,
}

/// Clears the terminal's current line and returns the cursor to its start.
const CLEAR_LINE: &str = "\r\x1b[2K";

impl<W: Write> BuildProgress<W> {
    /// Starts showing the build of `reference` on a terminal `width` columns wide (0 when it
    /// does not know, as a pseudo-terminal nobody sized says: then the usual 80).
    pub fn start(out: W, mode: Mode, width: usize, reference: &str, now: Instant) -> Self {
        let width = match width {
            0 => 80,
            w => w.max(20),
        };
        let mut shown = BuildProgress {
            out,
            mode,
            width,
            reference: reference.to_owned(),
            started: now,
            step: None,
            drawn: false,
        };
        match mode {
            Mode::Live => shown.draw(now),
            Mode::Lines | Mode::Verbose => shown.say(&format!(
                "paude: building image {reference} (the first build takes a few minutes)"
            )),
        }
        shown
    }

    /// Takes one line of the engine's build output.
    pub fn line(&mut self, line: &str, now: Instant) {
        if self.mode == Mode::Verbose {
            self.say(&format!("  {line}"));
            return;
        }
        let Some(step) = build_step(line) else {
            return;
        };
        match self.mode {
            Mode::Live => {
                self.step = Some(step);
                self.draw(now);
            }
            _ => {
                let at = format_elapsed(now.saturating_duration_since(self.started));
                self.say(&format!("paude:   {step} (at {at})"));
                self.step = Some(step);
            }
        }
    }

    /// Redraws the status line with the time so far (on a terminal; nothing otherwise).
    pub fn tick(&mut self, now: Instant) {
        if self.mode == Mode::Live {
            self.draw(now);
        }
    }

    /// Ends the display: the status line gives way to one line saying how long the build took,
    /// or, when it failed, to nothing, so the error that follows starts on a clean line.
    pub fn finish(&mut self, succeeded: bool, now: Instant) {
        self.clear();
        if succeeded {
            let took = format_elapsed(now.saturating_duration_since(self.started));
            let reference = self.reference.clone();
            self.say(&format!("paude: built image {reference} in {took}"));
        }
    }

    /// The text the status line shows at `now`, before it is cut to the terminal's width.
    fn status(&self, now: Instant) -> String {
        let took = format_elapsed(now.saturating_duration_since(self.started));
        // The image without its tag, to leave room for the step; the closing line names it in
        // full.
        let image = self
            .reference
            .rsplit_once(':')
            .map_or(self.reference.as_str(), |(repository, _)| repository);
        match &self.step {
            Some(step) => format!("paude: building image {image} [{took}] {step}"),
            None => format!("paude: building image {image} [{took}]"),
        }
    }

    fn draw(&mut self, now: Instant) {
        let status = cut(&self.status(now), self.width - 1);
        let _ = write!(self.out, "{CLEAR_LINE}{status}");
        let _ = self.out.flush();
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            let _ = write!(self.out, "{CLEAR_LINE}");
            let _ = self.out.flush();
            self.drawn = false;
        }
    }

    fn say(&mut self, text: &str) {
        self.clear();
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }

    /// The writer, for tests.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// `step 3/9: RUN ...` from an engine's step line: Podman's `STEP 3/9: RUN ...` or Docker's
/// `Step 3/9 : RUN ...`. Other lines are not steps.
pub fn build_step(line: &str) -> Option<String> {
    let rest = line
        .strip_prefix("STEP ")
        .or_else(|| line.strip_prefix("Step "))?;
    let (count, what) = rest.split_once(':')?;
    let count = count.trim();
    let (n, total) = count.split_once('/')?;
    if n.parse::<u32>().is_err() || total.parse::<u32>().is_err() {
        return None;
    }
    // A RUN step shows its shell script on one line; runs of blanks from its continuation lines
    // are collapsed, and a long one is cut.
    let what = what.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(format!("step {count}: {}", cut(&what, STEP_TEXT)))
}

/// How much of a step's instruction its line shows.
const STEP_TEXT: usize = 100;

/// A duration as a build's elapsed time: `7s`, `1m 02s`, `1h 05m`.
pub fn format_elapsed(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `text` cut to at most `max` characters, marking a cut with `…`.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REF: &str = "localhost/paude-agent-shell:0123456789abcdef";

    fn feed(mode: Mode, width: usize) -> String {
        let t0 = Instant::now();
        let mut p = BuildProgress::start(Vec::new(), mode, width, REF, t0);
        p.line("STEP 1/3: FROM localhost/base", t0);
        p.line(
            "Getting image source signatures",
            t0 + Duration::from_secs(1),
        );
        p.line(
            "STEP 2/3: RUN apt-get update && apt-get install -y git curl tmux",
            t0 + Duration::from_secs(2),
        );
        p.tick(t0 + Duration::from_secs(75));
        p.line("STEP 3/3: USER 1000:1000", t0 + Duration::from_secs(80));
        p.finish(true, t0 + Duration::from_secs(81));
        String::from_utf8(p.into_inner()).unwrap()
    }

    #[test]
    fn a_terminal_gets_one_status_line_with_the_step_and_the_time_so_far() {
        let out = feed(Mode::Live, 200);
        assert!(!out[..out.len() - 1].contains('\n'), "{out:?}");
        assert!(
            out.contains(&format!(
                "{CLEAR_LINE}paude: building image localhost/paude-agent-shell [1m 15s] step \
                 2/3: RUN apt-get update"
            )),
            "{out:?}"
        );
        assert!(out.contains("[1m 20s] step 3/3: USER 1000:1000"), "{out:?}");
        assert!(
            out.ends_with(&format!("{CLEAR_LINE}paude: built image {REF} in 1m 21s\n")),
            "{out:?}"
        );
        // Other output of the engine stays off the screen.
        assert!(!out.contains("signatures"), "{out:?}");
    }

    #[test]
    fn the_status_line_never_wraps() {
        let out = feed(Mode::Live, 60);
        // Every redrawn status frame fits; only the closing line, a plain one, may be longer.
        for frame in out
            .split(CLEAR_LINE)
            .filter(|f| !f.is_empty() && !f.ends_with('\n'))
        {
            assert!(frame.chars().count() < 60, "{frame:?}");
        }
        assert!(out.contains('…'));
    }

    #[test]
    fn a_terminal_of_unknown_size_is_taken_as_80_columns() {
        let out = feed(Mode::Live, 0);
        let frame = out
            .split(CLEAR_LINE)
            .find(|f| f.contains("step 2/3"))
            .unwrap();
        assert_eq!(frame.chars().count(), 79, "{frame:?}");
    }

    #[test]
    fn elsewhere_each_step_is_a_plain_line() {
        let out = feed(Mode::Lines, 80);
        assert_eq!(
            out,
            format!(
                "paude: building image {REF} (the first build takes a few minutes)\n\
                 paude:   step 1/3: FROM localhost/base (at 0s)\n\
                 paude:   step 2/3: RUN apt-get update && apt-get install -y git curl tmux (at 2s)\n\
                 paude:   step 3/3: USER 1000:1000 (at 1m 20s)\n\
                 paude: built image {REF} in 1m 21s\n"
            )
        );
        assert!(!out.contains('\x1b') && !out.contains('\r'));
    }

    #[test]
    fn verbose_shows_every_line_of_the_engine() {
        let out = feed(Mode::Verbose, 80);
        assert!(
            out.contains("\n  Getting image source signatures\n"),
            "{out}"
        );
        assert!(out.contains("\n  STEP 2/3: RUN apt-get update"), "{out}");
        assert!(!out.contains('\x1b'));
    }

    #[test]
    fn a_failed_build_leaves_a_clean_line_for_the_error() {
        let t0 = Instant::now();
        let mut p = BuildProgress::start(Vec::new(), Mode::Live, 100, REF, t0);
        p.line("STEP 1/2: FROM 127.0.0.1:1/base", t0);
        p.finish(false, t0);
        let out = String::from_utf8(p.into_inner()).unwrap();
        assert!(out.ends_with(CLEAR_LINE), "{out:?}");
    }

    #[test]
    fn steps_of_podman_and_docker_are_recognised() {
        assert_eq!(
            build_step("STEP 3/9: RUN sh -eu /etc/paude/install.sh").as_deref(),
            Some("step 3/9: RUN sh -eu /etc/paude/install.sh")
        );
        assert_eq!(
            build_step("Step 2/5 : COPY paude-proxy /usr/local/bin/paude-proxy").as_deref(),
            Some("step 2/5: COPY paude-proxy /usr/local/bin/paude-proxy")
        );
        let long = format!(
            "STEP 5/15: RUN set -e;     if true; then {}",
            "x ".repeat(80)
        );
        let step = build_step(&long).unwrap();
        assert!(
            step.starts_with("step 5/15: RUN set -e; if true; then x x"),
            "{step}"
        );
        assert!(step.ends_with('…') && step.chars().count() < 120, "{step}");
        for other in [
            "STEP x/9: RUN",
            "Stepping 1/2: x",
            "--> abc",
            "STEP 1/2 RUN",
        ] {
            assert_eq!(build_step(other), None, "{other}");
        }
    }

    #[test]
    fn elapsed_times_read_like_a_clock() {
        assert_eq!(format_elapsed(Duration::from_secs(7)), "7s");
        assert_eq!(format_elapsed(Duration::from_secs(62)), "1m 02s");
        assert_eq!(format_elapsed(Duration::from_secs(3900)), "1h 05m");
    }
}
