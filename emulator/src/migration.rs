//! Outgoing and incoming migration, as the monitor and `--incoming` drive them.

use serde_json::{Map, Value};

use crate::qmp::QmpError;

pub struct MigrationController {}

impl MigrationController {
    pub fn execute(&self, name: &str, _args: &Map<String, Value>) -> Result<Value, QmpError> {
        Err(QmpError {
            class: "CommandNotFound",
            desc: format!("the command {name} has not been found"),
        })
    }
}
