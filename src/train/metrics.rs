//! The metrics log (`metrics.jsonl`, one JSON object per step or evaluation) and the loss-curve
//! picture drawn from it.

use crate::error::{Error, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

/// An append-only JSONL log, flushed after every line.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens the log for a run that continues after `keep_through_step` (dropping later lines,
    /// which a resumed run will write again); `None` starts it afresh.
    pub fn open(path: &Path, keep_through_step: Option<u64>) -> Result<Self> {
        let kept: Vec<String> = match keep_through_step {
            None => Vec::new(),
            Some(step) => std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s <= step)
                })
                .map(String::from)
                .collect(),
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        crate::io::atomic::write_atomic(path, |f| f.write_all(text.as_bytes()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        let line = format!("{record}\n");
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Points `(step, value)` of one series.
type Curve = Vec<(f64, f64)>;

/// (step, loss) and (step, eval_loss) points of a metrics log.
pub fn read_curves(path: &Path) -> Result<(Curve, Curve)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let Some(step) = v.get("step").and_then(Value::as_f64) else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(Value::as_f64) {
            train.push((step, l));
        }
        if let Some(l) = v.get("eval_loss").and_then(Value::as_f64) {
            eval.push((step, l));
        }
    }
    Ok((train, eval))
}

/// An SVG line chart of the training (blue) and evaluation (orange) loss against the step.
pub fn loss_curve_svg(train: &[(f64, f64)], eval: &[(f64, f64)]) -> String {
    let (w, h, pad) = (640.0, 360.0, 48.0);
    let all = train.iter().chain(eval);
    let (x_max, y_max) = all
        .clone()
        .fold((1.0f64, f64::MIN), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let y_min = all.fold(f64::MAX, |y, p| y.min(p.1)).min(y_max - 1e-9);
    let sx = |x: f64| pad + (x / x_max) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y_min) / (y_max - y_min) * (h - 2.0 * pad);
    let line = |pts: &[(f64, f64)], color: &str| {
        let coords: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            coords.join(" ")
        )
    };
    format!(
        concat!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">",
            "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>",
            "<line x1=\"{p}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>",
            "<line x1=\"{p}\" y1=\"{p}\" x2=\"{p}\" y2=\"{b}\" stroke=\"black\"/>",
            "<text x=\"{p}\" y=\"{t}\">loss {ymax:.3}</text><text x=\"{p}\" y=\"{lb}\">{ymin:.3}</text>",
            "<text x=\"{r}\" y=\"{lb}\" text-anchor=\"end\">step {xmax}</text>",
            "<text x=\"{r}\" y=\"{t}\" text-anchor=\"end\"><tspan fill=\"#1f77b4\">train</tspan> <tspan fill=\"#ff7f0e\">eval</tspan></text>",
            "{train}{eval}</svg>\n"
        ),
        w = w,
        h = h,
        p = pad,
        b = h - pad,
        r = w - pad,
        t = pad - 8.0,
        lb = h - pad + 16.0,
        ymax = y_max,
        ymin = y_min,
        xmax = x_max,
        train = line(train, "#1f77b4"),
        eval = line(eval, "#ff7f0e"),
    )
}
