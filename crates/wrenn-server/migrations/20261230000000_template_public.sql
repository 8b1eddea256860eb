-- Whether a team shared its template with every team (`PATCH /templates/{id}` with `public`):
-- 1 makes it usable, by ID or name, by every team, like the built-in templates (those with no
-- team, public whatever this says). 0 for every template made before.
ALTER TABLE templates ADD COLUMN public BIGINT NOT NULL DEFAULT 0;
