//! Workload certificates for Kubernetes pods, authorised by the pod's service-account token.
//!
//! The injected sidecar presents a projected service-account token with the audience
//! [`crate::webhook::TOKEN_AUDIENCE`] as the token of its CSR. The control plane asks the API
//! server (`TokenReview`, authentication.k8s.io/v1) who it belongs to, and signs only for the
//! SPIFFE identity of that service account: `system:serviceaccount:<ns>:<sa>` may have
//! `spiffe://<td>/ns/<ns>/sa/<sa>` and nothing else.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::Api;

use isthmus_core::identity::SpiffeId;

/// Verifies service-account tokens with the API server.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
}

impl TokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        TokenReviewer {
            client,
            audience: crate::webhook::TOKEN_AUDIENCE.to_string(),
        }
    }

    /// Whether `token` is a valid service-account token for `id`; the error says why not.
    pub async fn allows(&self, token: &str, id: &SpiffeId) -> Result<(), String> {
        if token.split('.').count() != 3 {
            return Err("the token is neither a bootstrap token nor a service-account JWT".into());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("the TokenReview failed: {e}"))?;
        let status = answer
            .status
            .ok_or("the API server's TokenReview has no status")?;
        check(&status, id, &self.audience)
    }
}

/// Judges a TokenReview's status for `id` (pure).
pub fn check(status: &TokenReviewStatus, id: &SpiffeId, audience: &str) -> Result<(), String> {
    if status.authenticated != Some(true) {
        return Err(format!(
            "the API server did not authenticate the token{}",
            status
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    if let Some(audiences) = &status.audiences {
        if !audiences.iter().any(|a| a == audience) {
            return Err(format!("the token is not for the audience {audience:?}"));
        }
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    let expected = format!(
        "system:serviceaccount:{}:{}",
        id.namespace(),
        id.service_account()
    );
    if username != expected {
        return Err(format!(
            "the token belongs to {username:?}, which may not have {id} (only {expected:?} may)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(authenticated: bool, user: &str, audiences: Option<&[&str]>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo {
                username: Some(user.to_string()),
                ..Default::default()
            }),
            audiences: audiences.map(|a| a.iter().map(|s| s.to_string()).collect()),
            error: (!authenticated).then(|| "token expired".to_string()),
        }
    }

    #[test]
    fn only_the_tokens_own_service_account_identity_is_allowed() {
        let id = SpiffeId::new("east.isthmus.local", "bookinfo", "ratings");
        let sa = "system:serviceaccount:bookinfo:ratings";
        assert_eq!(
            check(&status(true, sa, Some(&["isthmus"])), &id, "isthmus"),
            Ok(())
        );
        assert_eq!(check(&status(true, sa, None), &id, "isthmus"), Ok(()));
        let other = check(
            &status(true, "system:serviceaccount:bookinfo:reviews", None),
            &id,
            "isthmus",
        )
        .unwrap_err();
        assert!(
            other.contains("reviews") && other.contains("ratings"),
            "{other}"
        );
        let expired = check(&status(false, sa, None), &id, "isthmus").unwrap_err();
        assert!(expired.contains("token expired"), "{expired}");
        let audience = check(&status(true, sa, Some(&["api"])), &id, "isthmus").unwrap_err();
        assert!(audience.contains("audience"), "{audience}");
        let user = check(&status(true, "alice", None), &id, "isthmus").unwrap_err();
        assert!(user.contains("alice"), "{user}");
    }
}
