-- Hearth control-plane schema, version 4: per-sandbox network settings.

-- The SDK's network settings as accepted (allowOut, denyOut, dnsServers,
-- allowPublicTraffic), as JSON; NULL for a sandbox created before this version.
ALTER TABLE sandboxes ADD COLUMN network TEXT;
-- Token the proxy requires on sandbox ports when allowPublicTraffic is false.
ALTER TABLE sandboxes ADD COLUMN traffic_access_token TEXT;
