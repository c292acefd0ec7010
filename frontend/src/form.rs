//! The settings form shared by ad-hoc analysis and monitors: what the user typed, turned into
//! protocol settings or an error that names the field.

use protocol::{GenerationSettings, WindowSettings};

/// The editable settings, as typed.
#[derive(Clone, PartialEq, Debug)]
pub(crate) struct Form {
    pub(crate) prompt: String,
    pub(crate) rtsp_url: String,
    pub(crate) rtsp_udp: bool,
    pub(crate) url: String,
    pub(crate) window_s: String,
    pub(crate) stride_s: String,
    pub(crate) fps: String,
    pub(crate) min_pixels: String,
    pub(crate) max_pixels: String,
    pub(crate) max_tokens: String,
    pub(crate) temperature: String,
    pub(crate) api_key: String,
}

impl Default for Form {
    fn default() -> Self {
        Form {
            prompt: "Describe what is happening.".into(),
            rtsp_url: String::new(),
            rtsp_udp: false,
            url: String::new(),
            window_s: "4".into(),
            stride_s: "4".into(),
            fps: "2".into(),
            min_pixels: "4096".into(),
            max_pixels: "262144".into(),
            max_tokens: "128".into(),
            temperature: "0".into(),
            api_key: String::new(),
        }
    }
}

/// A field of the form.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Field {
    Prompt,
    RtspUrl,
    Url,
    WindowS,
    StrideS,
    Fps,
    MinPixels,
    MaxPixels,
    MaxTokens,
    Temperature,
}

pub(crate) fn number<T: std::str::FromStr>(s: &str, name: &str) -> Result<T, String> {
    s.trim().parse().map_err(|_| format!("{name} must be a number (got {s:?})"))
}

impl Form {
    /// Sets one field.
    pub(crate) fn set(&mut self, field: Field, v: String) {
        match field {
            Field::Prompt => self.prompt = v,
            Field::RtspUrl => self.rtsp_url = v,
            Field::Url => self.url = v,
            Field::WindowS => self.window_s = v,
            Field::StrideS => self.stride_s = v,
            Field::Fps => self.fps = v,
            Field::MinPixels => self.min_pixels = v,
            Field::MaxPixels => self.max_pixels = v,
            Field::MaxTokens => self.max_tokens = v,
            Field::Temperature => self.temperature = v,
        }
    }

    pub(crate) fn window(&self) -> Result<WindowSettings, String> {
        Ok(WindowSettings {
            seconds: Some(number(&self.window_s, "Window")?),
            stride_seconds: Some(number(&self.stride_s, "Stride")?),
            fps: Some(number(&self.fps, "FPS")?),
            min_pixels: Some(number(&self.min_pixels, "Min pixels")?),
            max_pixels: Some(number(&self.max_pixels, "Max pixels")?),
        })
    }

    pub(crate) fn generation(&self) -> Result<GenerationSettings, String> {
        Ok(GenerationSettings {
            max_tokens: Some(number(&self.max_tokens, "Max tokens")?),
            temperature: Some(number(&self.temperature, "Temperature")?),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_becomes_protocol_settings_or_says_which_field_is_wrong() {
        let f = Form::default();
        let w = f.window().unwrap();
        assert_eq!((w.seconds, w.stride_seconds, w.fps), (Some(4.0), Some(4.0), Some(2.0)));
        assert_eq!((w.min_pixels, w.max_pixels), (Some(4096), Some(262_144)));
        let g = f.generation().unwrap();
        assert_eq!((g.max_tokens, g.temperature), (Some(128), Some(0.0)));
        let bad = Form { fps: "two".into(), ..Form::default() };
        assert!(bad.window().unwrap_err().contains("FPS"));
        let bad = Form { max_tokens: "-1".into(), ..Form::default() };
        assert!(bad.generation().unwrap_err().contains("Max tokens"));
        let mut f = Form::default();
        f.set(Field::Fps, "5".into());
        assert_eq!(f.window().unwrap().fps, Some(5.0));
    }
}
