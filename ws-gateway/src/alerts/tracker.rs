//! When an incident opens and closes: the confirmation window (N positive of the last M
//! windows), clearing (K negative windows in a row) and the cooldown after a close. Pure logic,
//! fed one verdict per window in window order.

use std::collections::VecDeque;

/// What a window's verdict did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing changed.
    Nothing,
    /// The rule is confirmed: an incident opens.
    Open,
    /// A positive window while the incident is open: it joins the incident.
    Extend,
    /// The incident is cleared.
    Resolve,
}

/// One monitor's alert state.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    confirm: (u32, u32),
    clear_after: u32,
    cooldown_ms: i64,
    /// The last M verdicts (true: positive).
    recent: VecDeque<bool>,
    open: bool,
    negatives: u32,
    quiet_until_ms: i64,
}

impl Tracker {
    /// A tracker for `confirm` = (N, M), closing after `clear_after` negatives.
    pub(crate) fn new(confirm: (u32, u32), clear_after: u32, cooldown_ms: i64, open: bool) -> Self {
        Tracker {
            confirm,
            clear_after,
            cooldown_ms,
            recent: VecDeque::with_capacity(confirm.1 as usize),
            open,
            negatives: 0,
            quiet_until_ms: i64::MIN,
        }
    }

    /// Whether an incident is open.
    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        self.open
    }

    /// A window's verdict: positive, negative, or `None` when its answer was cut and says
    /// nothing (it counts neither way).
    pub(crate) fn record(&mut self, verdict: Option<bool>, now_ms: i64) -> Step {
        let Some(positive) = verdict else { return Step::Nothing };
        if self.recent.len() == self.confirm.1 as usize {
            self.recent.pop_front();
        }
        self.recent.push_back(positive);
        if self.open {
            if positive {
                self.negatives = 0;
                return Step::Extend;
            }
            self.negatives += 1;
            if self.negatives < self.clear_after {
                return Step::Nothing;
            }
            self.open = false;
            self.negatives = 0;
            self.recent.clear();
            self.quiet_until_ms = now_ms.saturating_add(self.cooldown_ms);
            return Step::Resolve;
        }
        let positives = self.recent.iter().filter(|p| **p).count() as u32;
        if positive && positives >= self.confirm.0 && now_ms >= self.quiet_until_ms {
            self.open = true;
            self.negatives = 0;
            return Step::Open;
        }
        Step::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::Step::{Extend, Nothing, Open, Resolve};
    use super::*;

    fn run(t: &mut Tracker, verdicts: &[(Option<bool>, i64)]) -> Vec<Step> {
        verdicts.iter().map(|(v, at)| t.record(*v, *at)).collect()
    }

    #[test]
    fn two_of_three_confirm_and_two_negatives_clear() {
        let mut t = Tracker::new((2, 3), 2, 0, false);
        let (y, n) = (Some(true), Some(false));
        let steps =
            run(&mut t, &[(y, 0), (n, 1), (n, 2), (y, 3), (n, 4), (y, 5), (y, 6), (n, 7), (y, 8), (n, 9), (n, 10)]);
        // y . . : 1 of 3; y n y: 2 of 3 opens at the second positive.
        assert_eq!(
            steps,
            [Nothing, Nothing, Nothing, Nothing, Nothing, Open, Extend, Nothing, Extend, Nothing, Resolve]
        );
        assert!(!t.is_open());
    }

    #[test]
    fn positives_spread_wider_than_the_span_never_confirm() {
        let mut t = Tracker::new((2, 3), 1, 0, false);
        let (y, n) = (Some(true), Some(false));
        let steps = run(&mut t, &[(y, 0), (n, 1), (n, 2), (y, 3), (n, 4), (n, 5), (y, 6)]);
        assert!(steps.iter().all(|s| *s == Nothing), "{steps:?}");
    }

    #[test]
    fn cut_answers_count_neither_way() {
        let mut t = Tracker::new((2, 2), 1, 0, false);
        let steps = run(&mut t, &[(Some(true), 0), (None, 1), (Some(true), 2), (None, 3), (Some(false), 4)]);
        assert_eq!(steps, [Nothing, Nothing, Open, Nothing, Resolve]);
    }

    #[test]
    fn cooldown_holds_a_new_incident_back_then_lets_it_open() {
        let mut t = Tracker::new((1, 1), 1, 10_000, false);
        let y = Some(true);
        let steps = run(&mut t, &[(y, 0), (Some(false), 1_000), (y, 2_000), (y, 10_999), (y, 11_000)]);
        assert_eq!(steps, [Open, Resolve, Nothing, Nothing, Open]);
    }

    #[test]
    fn an_incident_open_before_a_restart_is_extended_and_cleared() {
        let mut t = Tracker::new((3, 5), 1, 0, true);
        assert_eq!(t.record(Some(true), 0), Extend);
        assert_eq!(t.record(Some(false), 1), Resolve);
    }
}
