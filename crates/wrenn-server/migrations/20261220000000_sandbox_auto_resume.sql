-- Whether traffic through the edge proxy resumes the sandbox while it is paused (a create's
-- `autoResume.enabled`; only with `autoPause`). 0 for every sandbox made before.
-- There is no column for the pause mode: every pause keeps memory and files (`full`), and a
-- create or pause asking for a filesystem-only one is refused.
ALTER TABLE sandboxes ADD COLUMN auto_resume BIGINT NOT NULL DEFAULT 0;
