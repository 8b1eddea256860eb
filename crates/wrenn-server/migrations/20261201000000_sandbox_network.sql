-- The `network` a sandbox was created with (JSON of the API's `NetworkConfig`, egress lists
-- validated), replaced by `PUT /sandboxes/{id}/network`. NULL: none given.
ALTER TABLE sandboxes ADD COLUMN network TEXT;
