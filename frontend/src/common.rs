//! What every view shares: problems shown with advice.

use protocol::ErrorCode;

/// A problem to show, with what to do about it.
#[derive(Clone, PartialEq, Debug)]
pub(crate) struct Problem {
    pub(crate) message: String,
    pub(crate) hint: &'static str,
}

/// What to do about an error of this kind.
pub(crate) fn hint(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::NotFound => "It is gone (deleted, or ended); reload the list.",
        ErrorCode::Conflict => "That name is taken: choose another.",
        ErrorCode::BadRequest => "Check the source and the settings, then start again.",
        ErrorCode::Source => {
            "Check that the source is reachable from the server (address, path, user and password) and plays."
        }
        ErrorCode::Model => "The model failed on one window; the session goes on.",
        ErrorCode::Overloaded => "The server is busy or the model is still loading; wait a moment and start again.",
        ErrorCode::Unauthorized => "This server needs an API key: enter it at the top of the page.",
        ErrorCode::Internal => "Something failed on the server; its log says more. Try again.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_has_advice() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Source,
            ErrorCode::Model,
            ErrorCode::Overloaded,
            ErrorCode::Unauthorized,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::Internal,
        ] {
            assert!(hint(code).len() > 20);
        }
        assert!(hint(ErrorCode::Unauthorized).contains("API key"));
    }
}
