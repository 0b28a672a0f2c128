fn main() -> std::process::ExitCode {
    pgfailover::cli::main()
}
