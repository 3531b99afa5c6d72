//! What every Terraform type of this provider implements ([`Resource`], [`DataSource`]) and
//! what it is handed: the configured connection ([`Conn`]), and what plans and failed
//! applies return ([`Planned`], [`Failure`]). The provider dispatches to them; they depend on
//! this, not on the provider.

use isthmus_core::client::ControlClient;
use isthmus_federation::KvClient;

use crate::cty::Value;
use crate::diag::{Diag, Diags};
use crate::schema::Block;

/// The connection a configured provider uses: one control plane's API, over TLS
/// (docs/control-api.md). It carries the policy services `isthmus apply/get/delete` use and
/// the federation store's `Kv` API (membership, records) of the member the control plane runs.
#[derive(Clone)]
pub struct Conn {
    pub control: ControlClient,
    pub control_addr: String,
}

impl Conn {
    /// The federation store's `Kv` API, through the control plane's TLS port.
    pub async fn kv(&self) -> Result<KvClient, Diags> {
        Ok(KvClient::from_channel(self.control.channel()))
    }
}

/// What a plan decided.
pub struct Planned {
    pub state: Value,
    /// Top-level attributes whose change replaces the resource.
    pub requires_replace: Vec<&'static str>,
}

/// A failed create or update: the errors, and the state to record if something was made.
pub struct Failure {
    pub state: Option<Value>,
    pub diags: Diags,
}

impl From<Diags> for Failure {
    fn from(diags: Diags) -> Failure {
        Failure { state: None, diags }
    }
}

impl From<Diag> for Failure {
    fn from(d: Diag) -> Failure {
        Failure {
            state: None,
            diags: vec![d],
        }
    }
}

/// A managed resource type.
#[tonic::async_trait]
pub trait Resource: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn schema(&self) -> Block;
    /// Offline checks of a configuration, whose values may still be unknown.
    fn validate(&self, config: &Value) -> Diags;
    /// The planned state from Terraform's proposed one (`prior` None: a create).
    fn plan(&self, prior: Option<&Value>, proposed: Value) -> Result<Planned, Diags>;
    async fn create(&self, conn: &Conn, planned: &Value) -> Result<Value, Failure>;
    async fn update(&self, conn: &Conn, prior: &Value, planned: &Value) -> Result<Value, Failure>;
    async fn delete(&self, conn: &Conn, prior: &Value) -> Result<(), Diags>;
    /// The resource as it is now; None when it no longer exists.
    async fn read(&self, conn: &Conn, state: &Value) -> Result<Option<Value>, Diags>;
    /// The state of an existing object named by an import ID.
    async fn import(&self, conn: &Conn, id: &str) -> Result<Value, Diags>;
}

/// A data source type.
#[tonic::async_trait]
pub trait DataSource: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn schema(&self) -> Block;
    fn validate(&self, config: &Value) -> Diags;
    async fn read(&self, conn: &Conn, config: &Value) -> Result<Value, Diags>;
}
