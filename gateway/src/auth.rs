//! Optional JWT authentication, as connect middleware: with a secret configured, a connection
//! needs `auth: { token }`, an HS256 token with `sub`, `name` and `exp` (and `aud` when one is
//! configured). The display name then comes from the token, never from the client's payload.

use std::sync::Arc;

use chatify_shared::config::{AuthSettings, Limits};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::Value;

/// The authenticated user of a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Stable user id (`sub`): scopes `clientId` retries to the user.
    pub user_id: String,
    /// Display name (`name`).
    pub name: String,
    /// Expiry, seconds since the epoch: the connection ends then (see [`crate::expiry`]).
    pub expires_at: u64,
    /// The token's `rooms` claim: the rooms (exact names, or prefixes ending in `*`) the user
    /// may use under the `token` access policy; none without the claim.
    pub rooms: Arc<[String]>,
    /// Whether the token's `roles` claim holds `"moderator"`.
    pub moderator: bool,
}

/// Why a connection was refused; the text is what the client's `connect_error` shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: connect with auth: {{ token }}")]
    MissingToken,
    #[error("the auth token has expired")]
    Expired,
    #[error("the auth token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the auth token's signature is invalid")]
    BadSignature,
    #[error("the auth token is for another audience")]
    WrongAudience,
    #[error("the auth token must be signed with HS256")]
    WrongAlgorithm,
    #[error("the auth token is invalid: {0}")]
    Invalid(String),
}

/// Longest accepted `sub`: it is shown to other members as the user's id.
const SUB_MAX_BYTES: usize = 256;
/// Most entries of a token's `rooms` claim, and the longest entry: a connection keeps them.
const ROOMS_CLAIM_MAX: usize = 1000;
const ROOM_PATTERN_MAX_BYTES: usize = 1024;

#[derive(Deserialize)]
struct Claims {
    sub: String,
    name: String,
    exp: u64,
    /// The rooms the user may use under the `token` access policy.
    #[serde(default)]
    rooms: Option<Vec<String>>,
    /// The user's roles (`"moderator"`).
    #[serde(default)]
    roles: Option<Vec<String>>,
}

/// Checks tokens against the configured secret.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl Authenticator {
    /// `None` when no secret is configured (anonymous clients).
    pub fn from_settings(settings: &AuthSettings) -> Option<Self> {
        let secret = settings.secret()?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_nbf = true;
        match &settings.jwt_audience {
            Some(aud) if !aud.is_empty() => {
                validation.set_audience(&[aud]);
                validation.set_required_spec_claims(&["exp", "sub", "aud"]);
            }
            _ => {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp", "sub"]);
            }
        }
        Some(Self {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        })
    }

    /// Verifies the handshake's auth payload.
    pub fn verify(&self, auth: Option<&Value>, limits: &Limits) -> Result<Identity, AuthError> {
        let token = auth
            .and_then(|a| a.get("token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?;
        self.verify_token(token, limits)
    }

    /// Verifies a token.
    pub fn verify_token(&self, token: &str, limits: &Limits) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::WrongAlgorithm);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm,
                _ => AuthError::Invalid(e.to_string()),
            },
        )?;
        let claims = data.claims;
        let name = crate::payload::username(&claims.name, limits)
            .map_err(|e| AuthError::Invalid(format!("name claim: {}", e.message)))?;
        if claims.sub.is_empty() || claims.sub.len() > SUB_MAX_BYTES {
            return Err(AuthError::Invalid(format!(
                "sub claim must be 1..={SUB_MAX_BYTES} bytes"
            )));
        }
        let rooms = claims.rooms.unwrap_or_default();
        if rooms.len() > ROOMS_CLAIM_MAX || rooms.iter().any(|r| r.len() > ROOM_PATTERN_MAX_BYTES) {
            return Err(AuthError::Invalid(format!(
                "rooms claim: at most {ROOMS_CLAIM_MAX} entries of at most {ROOM_PATTERN_MAX_BYTES} bytes"
            )));
        }
        Ok(Identity {
            user_id: claims.sub,
            name,
            expires_at: claims.exp,
            rooms: rooms.into(),
            moderator: claims
                .roles
                .unwrap_or_default()
                .iter()
                .any(|r| r == "moderator"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    fn auth(aud: Option<&str>) -> Authenticator {
        Authenticator::from_settings(&AuthSettings {
            jwt_secret: Some("secret".to_owned().into()),
            jwt_audience: aud.map(str::to_owned),
        })
        .unwrap_or_else(|| panic!("a secret is set"))
    }

    fn token(claims: Value, key: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap_or_default()
    }

    fn in_an_hour() -> u64 {
        jsonwebtoken::get_current_timestamp() + 3600
    }

    #[test]
    fn a_valid_token_names_the_user() {
        let t = token(
            json!({"sub": "u1", "name": "Ann", "exp": in_an_hour()}),
            "secret",
        );
        let id = auth(None).verify(Some(&json!({"token": t})), &Limits::default());
        assert_eq!(
            id.map(|i| (i.user_id, i.name)),
            Ok(("u1".into(), "Ann".into()))
        );
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let l = Limits::default();
        let a = auth(Some("chat"));
        let exp = in_an_hour();
        assert_eq!(a.verify(None, &l), Err(AuthError::MissingToken));
        assert_eq!(a.verify(Some(&json!({})), &l), Err(AuthError::MissingToken));
        let expired = token(
            json!({"sub": "u", "name": "n", "exp": 1000, "aud": "chat"}),
            "secret",
        );
        assert_eq!(
            a.verify(Some(&json!({"token": expired})), &l),
            Err(AuthError::Expired)
        );
        let wrong_key = token(
            json!({"sub": "u", "name": "n", "exp": exp, "aud": "chat"}),
            "other",
        );
        assert_eq!(
            a.verify(Some(&json!({"token": wrong_key})), &l),
            Err(AuthError::BadSignature)
        );
        let wrong_aud = token(
            json!({"sub": "u", "name": "n", "exp": exp, "aud": "else"}),
            "secret",
        );
        assert_eq!(
            a.verify(Some(&json!({"token": wrong_aud})), &l),
            Err(AuthError::WrongAudience)
        );
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwibmFtZSI6Im4iLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(a.verify(Some(&json!({"token": none})), &l).is_err());
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &json!({"sub": "u", "name": "n", "exp": exp, "aud": "chat"}),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap_or_default();
        assert_eq!(
            a.verify(Some(&json!({"token": hs512})), &l),
            Err(AuthError::WrongAlgorithm)
        );
        let no_aud = token(json!({"sub": "u", "name": "n", "exp": exp}), "secret");
        assert!(
            a.verify(Some(&json!({"token": no_aud})), &l).is_err(),
            "aud is required when configured"
        );
        let later = jsonwebtoken::get_current_timestamp() + 600;
        let not_yet = token(
            json!({"sub": "u", "name": "n", "exp": exp, "nbf": later, "aud": "chat"}),
            "secret",
        );
        assert_eq!(
            a.verify(Some(&json!({"token": not_yet})), &l),
            Err(AuthError::NotYetValid)
        );
        let long_sub = token(
            json!({"sub": "s".repeat(257), "name": "n", "exp": exp, "aud": "chat"}),
            "secret",
        );
        assert!(matches!(
            a.verify(Some(&json!({"token": long_sub})), &l),
            Err(AuthError::Invalid(_))
        ));
        let no_name = token(json!({"sub": "u", "exp": exp, "aud": "chat"}), "secret");
        assert!(matches!(
            a.verify(Some(&json!({"token": no_name})), &l),
            Err(AuthError::Invalid(_))
        ));
    }
}
