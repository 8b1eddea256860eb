-- Filesystem-only pauses. `auto_pause_memory`: whether a pause at the timeout keeps the memory
-- (a create's `autoPauseMemory`, default true); `paused_memory`: whether the sandbox's pause
-- under way or done keeps it (`pauseMode` `full`) or only its disk (`filesystem`: the resume
-- boots the disk cold). 1 for every sandbox made before: every pause then kept the memory.
ALTER TABLE sandboxes ADD COLUMN auto_pause_memory BIGINT NOT NULL DEFAULT 1;
ALTER TABLE sandboxes ADD COLUMN paused_memory BIGINT NOT NULL DEFAULT 1;
