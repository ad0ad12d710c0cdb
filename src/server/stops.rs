//! Stop strings matched across token boundaries.
//!
//! Generated text arrives in pieces (one per token, possibly empty). [`StopMatcher::push`] returns
//! the part of the text that can no longer become the start of a stop string and holds back the
//! rest: the longest suffix that is a prefix of some stop string. So a stop string split over
//! several tokens is still found, and nothing of it is ever sent to the client. Invariant: the
//! concatenation of everything returned is the generated text cut before the first stop string
//! (or the whole text, once [`StopMatcher::finish`] has released what was held).

pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the text that is safe to send and whether a stop string was found (then
    /// the returned text is everything before it and generation must end).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_string();
        self.held.drain(..keep);
        (out, false)
    }

    /// The text still held back (generation ended without a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let (text, stop) = m.push(p);
            out.push(text);
            if stop {
                return (out, true);
            }
        }
        out.push(m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_split_over_tokens_is_found_and_never_sent() {
        let (out, stopped) = run(&["END"], &["ab", "cE", "N", "Dxyz"]);
        assert!(stopped);
        assert_eq!(out, ["ab", "c", "", ""]);
        assert_eq!(out.concat(), "abc");
    }

    #[test]
    fn a_false_start_is_released() {
        let (out, stopped) = run(&["END"], &["aE", "Nx", "y"]);
        assert!(!stopped);
        assert_eq!(out, ["a", "ENx", "y", ""]);
        let (out, stopped) = run(&["END"], &["aEN"]);
        assert!(!stopped);
        assert_eq!(out, ["a", "EN"]);
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_kept_whole() {
        let (out, stopped) = run(&["é!", "b"], &["aé", "!b"]);
        assert!(stopped);
        assert_eq!(out.concat(), "a");
        let (out, stopped) = run(&["", "zz"], &["ñandú"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "ñandú");
    }
}
