//! Platform fakes and load scenarios.

pub mod fly;
pub mod scenario;
pub mod telegram;
pub mod whatsapp;
