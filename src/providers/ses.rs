//! Amazon SES notifications (the `Message` of an SNS notification): bounces and
//! complaints, in the notification format (`notificationType`) or the event-publishing
//! one (`eventType`). Deliveries, opens and the rest carry nothing to record.

use serde::Deserialize;

use super::{Finding, ProviderError, kind_by_status};
use crate::bounces::BounceKind;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notification {
    #[serde(alias = "eventType")]
    notification_type: String,
    bounce: Option<Bounce>,
    complaint: Option<Complaint>,
    mail: Option<Mail>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bounce {
    bounce_type: String,
    #[serde(default)]
    bounce_sub_type: String,
    #[serde(default)]
    bounced_recipients: Vec<Recipient>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Recipient {
    email_address: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    diagnostic_code: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Complaint {
    #[serde(default)]
    complained_recipients: Vec<Recipient>,
    #[serde(default)]
    complaint_feedback_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Mail {
    #[serde(default)]
    headers: Vec<Header>,
    #[serde(default)]
    common_headers: Option<CommonHeaders>,
}

#[derive(Deserialize)]
struct Header {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommonHeaders {
    #[serde(default)]
    message_id: Option<String>,
}

/// What an SES notification reports.
pub fn read(message: &str) -> Result<Vec<Finding>, ProviderError> {
    let notification: Notification = serde_json::from_str(message)
        .map_err(|e| ProviderError::Invalid(format!("not an SES notification: {e}")))?;
    // The letter's own Message-ID, when SES was told to include the original headers.
    let message_id = notification.mail.as_ref().and_then(|mail| {
        mail.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("message-id"))
            .map(|h| h.value.clone())
            .or_else(|| mail.common_headers.as_ref()?.message_id.clone())
    });
    let findings = match (
        notification.notification_type.as_str(),
        notification.bounce,
        notification.complaint,
    ) {
        ("Bounce", Some(bounce), _) => {
            // Permanent: the address is gone (or on SES's suppression list).
            // Transient: try later; a rejected content is the sender's problem.
            let fallback = match (bounce.bounce_type.as_str(), bounce.bounce_sub_type.as_str()) {
                ("Permanent", _) => BounceKind::Hard,
                ("Transient", "ContentRejected" | "AttachmentRejected") => BounceKind::Blocked,
                _ => BounceKind::Soft,
            };
            bounce
                .bounced_recipients
                .into_iter()
                .map(|r| Finding {
                    kind: kind_by_status(r.status.as_deref(), fallback),
                    diagnostic: Some(match &r.diagnostic_code {
                        Some(code) => {
                            format!("SES {}/{}: {code}", bounce.bounce_type, bounce.bounce_sub_type)
                        }
                        None => format!("SES {}/{}", bounce.bounce_type, bounce.bounce_sub_type),
                    }),
                    email: r.email_address,
                    status: r.status,
                    message_id: message_id.clone(),
                })
                .collect()
        }
        ("Complaint", _, Some(complaint)) => {
            let feedback = complaint.complaint_feedback_type.unwrap_or_default();
            // RFC 5965 `not-spam`: the reader took it back; kept, not counted.
            let kind = if feedback == "not-spam" {
                BounceKind::Ignored
            } else {
                BounceKind::Complaint
            };
            complaint
                .complained_recipients
                .into_iter()
                .map(|r| Finding {
                    kind,
                    email: r.email_address,
                    status: None,
                    diagnostic: Some(if feedback.is_empty() {
                        "SES complaint".into()
                    } else {
                        format!("SES complaint: {feedback}")
                    }),
                    message_id: message_id.clone(),
                })
                .collect()
        }
        ("Bounce" | "Complaint", _, _) => {
            return Err(ProviderError::Invalid(format!(
                "an SES {} notification without its details",
                notification.notification_type
            )));
        }
        _ => Vec::new(),
    };
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounces_and_complaints_are_read() {
        let bounce = r#"{"notificationType":"Bounce","bounce":{"bounceType":"Permanent","bounceSubType":"General",
            "bouncedRecipients":[{"emailAddress":"a@example.org","action":"failed","status":"5.1.1","diagnosticCode":"smtp; 550 5.1.1 user unknown"},
            {"emailAddress":"b@example.org","status":"5.7.1","diagnosticCode":"smtp; 550 5.7.1 blocked"}]},
            "mail":{"messageId":"ses-1","headers":[{"name":"Message-ID","value":"<letterbox.1.2.n@example.com>"}]}}"#;
        let found = read(bounce).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].kind, found[0].email.as_str()),
            (BounceKind::Hard, "a@example.org")
        );
        assert_eq!(
            found[0].diagnostic.as_deref(),
            Some("SES Permanent/General: smtp; 550 5.1.1 user unknown")
        );
        assert_eq!(
            found[0].message_id.as_deref(),
            Some("<letterbox.1.2.n@example.com>")
        );
        assert_eq!(
            found[1].kind,
            BounceKind::Blocked,
            "a block is never the address's fault"
        );
        let transient = r#"{"eventType":"Bounce","bounce":{"bounceType":"Transient","bounceSubType":"MailboxFull",
            "bouncedRecipients":[{"emailAddress":"c@example.org"}]}}"#;
        assert_eq!(read(transient).unwrap()[0].kind, BounceKind::Soft);
        let complaint = r#"{"notificationType":"Complaint","complaint":{"complainedRecipients":[{"emailAddress":"d@example.org"}],
            "complaintFeedbackType":"abuse"},"mail":{"commonHeaders":{"messageId":"<x@y>"}}}"#;
        let found = read(complaint).unwrap();
        assert_eq!(
            (found[0].kind, found[0].message_id.as_deref()),
            (BounceKind::Complaint, Some("<x@y>"))
        );
        assert!(
            read(r#"{"notificationType":"Delivery","delivery":{}}"#)
                .unwrap()
                .is_empty()
        );
        assert!(read(r#"{"notificationType":"Bounce"}"#).is_err());
        assert!(read("[]").is_err());
    }
}
