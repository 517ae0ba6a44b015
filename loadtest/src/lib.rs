//! Platform fakes and load scenarios.

pub mod discord;
pub mod fly;
pub mod scenario;
pub mod slack;
pub mod telegram;
pub mod whatsapp;
