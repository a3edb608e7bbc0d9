//! `strata`: one binary for every role. Parses arguments and hands over to the role's crate.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    strata_worker::memory::configure_allocator();
    let args = cli::Cli::parse();
    // Compute threads must be fixed before any tensor work starts a thread pool; rayon and candle
    // (`candle_core::utils::get_num_threads`) read them from this variable.
    if let Some(threads) = args.compute_threads() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    cli::init_logging(args.default_log_level(), args.log_format());
    let mut builder = match args.io_threads() {
        Some(0) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(args.run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
