//! WebSocket close codes used by Herald (SPEC §2 "Codes").

/// Normal closure: the echo of a client's close frame that carried no code.
pub const NORMAL: u16 = 1000;
/// Frame or message larger than the configured limit.
pub const TOO_LARGE: u16 = 1009;
/// Server restart: reconnect (sent at the end of a graceful drain).
pub const SERVICE_RESTART: u16 = 1012;
/// Going away: the client stopped answering heartbeats.
pub const GOING_AWAY: u16 = 1001;
/// Unauthenticated, or no authentication within the auth timeout.
pub const UNAUTHENTICATED: u16 = 4001;
/// Policy: repeated abuse (too many bad frames).
pub const POLICY: u16 = 4008;
/// Slow consumer: the send queue stayed full.
pub const SLOW_CONSUMER: u16 = 4009;
/// Token expired and not refreshed.
pub const TOKEN_EXPIRED: u16 = 4010;
/// Disconnected by the server API, or token revoked.
pub const DISCONNECTED: u16 = 4011;
/// Too many connections for this user.
pub const TOO_MANY_CONNECTIONS: u16 = 4029;
