//! Exit codes of the `shardbox` binary, one per kind of failure, so scripts can tell a mistake
//! of theirs from a failure of the machine.

/// Every line of the batch got a result, whatever the jobs' statuses.
pub const OK: u8 = 0;
/// Bad usage or configuration: unknown flags, a missing batch file, an output file that cannot
/// be created, a configuration file that does not parse.
pub const USAGE: u8 = 2;
/// shardbox failed while running: the batch could not be read or results could not be written.
pub const RUNTIME: u8 = 3;
/// The sandbox system could not start: runsc, cgroups, a root filesystem or a template build.
pub const SANDBOX: u8 = 4;
/// The run was interrupted by SIGINT or SIGTERM (128 + SIGINT, as shells report it).
pub const INTERRUPTED: u8 = 130;
