use anyhow::Context;
use chatify_persister::harperdb::HarperDb;
use chatify_persister::startup::Application;
use chatify_persister::{migrate, setup};
use chatify_shared::{Settings, healthcheck, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (settings, unknown_keys) = Settings::load().context("while loading configuration")?;
    if healthcheck::requested() {
        let p = &settings.persister;
        return healthcheck::probe(&p.host, p.port)
            .await
            .context("while checking the persister's health");
    }
    telemetry::init(&settings.log).context("while setting up logging")?;
    chatify_shared::config::warn_unknown(&unknown_keys);
    if std::env::args().nth(1).as_deref() == Some("setup") {
        let db = HarperDb::new(&settings.harperdb).context("while reading HarperDB settings")?;
        setup::setup(&db, &settings.harperdb)
            .await
            .context("while setting HarperDB up for the persister")?;
        tracing::info!("HarperDB is set up for the persister");
        return Ok(());
    }
    // Deletes rows: run with a super user as harperdb.username (the persister's own user may
    // not delete).
    if std::env::args().nth(1).as_deref() == Some("migrate-keys") {
        let db = HarperDb::new(&settings.harperdb).context("while reading HarperDB settings")?;
        let moved = migrate::migrate_long_keys(&db)
            .await
            .context("while moving rows to their rooms' current keys")?;
        tracing::info!(moved, "migration done");
        return Ok(());
    }
    if !settings.harperdb.admin_username.is_empty()
        || !secrecy::ExposeSecret::expose_secret(&settings.harperdb.admin_password).is_empty()
    {
        tracing::warn!(
            "harperdb.admin_username/admin_password are set, and only `chatify-persister setup` uses them: keep the super user's credentials out of the running persister's environment"
        );
    }
    let app = Application::build(settings)
        .await
        .context("while starting the persister")?;
    app.run_until_stopped(chatify_shared::shutdown::signal())
        .await
        .context("while running the persister")
}
