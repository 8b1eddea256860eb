// Shared helpers of the JS end-to-end suite: the official E2B SDK (unmodified, the copy that
// scripts/sdk-env.sh installs in tests/sdk/node_modules, pinned to 2.51.0 there), sandbox
// bookkeeping so every test file kills what it created, and polling.
//
// The environment (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY) comes from `wrenn up`.
import { randomUUID } from 'node:crypto'
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'

export * from '../../sdk/node_modules/e2b/dist/index.mjs'
import { Sandbox, ServiceBusyError } from '../../sdk/node_modules/e2b/dist/index.mjs'

const sdkPkg = createRequire(import.meta.url)(
  fileURLToPath(new URL('../../sdk/node_modules/e2b/package.json', import.meta.url)),
)
if (!sdkPkg.version.startsWith('2.')) throw new Error(`expected e2b 2.x, found ${sdkPkg.version}`)
export const sdkVersion = sdkPkg.version

for (const k of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[k]) throw new Error(`${k} is not set: source the env printed by \`wrenn up\``)
}
if (/^true$/i.test(process.env.E2B_DEBUG ?? '')) throw new Error('E2B_DEBUG must not be set')

/** Metadata value that tags every sandbox of this run, so list filters see only ours. */
export const runTag = `js-${randomUUID()}`

const created = new Set()

/**
 * `Sandbox.create` with this run's tag in its metadata. A 503 (no capacity: another suite may
 * share the instance) is retried for a while; any other error fails at once.
 */
export async function createSandbox(opts = {}) {
  const deadline = Date.now() + 90_000
  for (;;) {
    try {
      const sbx = await Sandbox.create({
        timeoutMs: 600_000,
        ...opts,
        metadata: { suite: 'e2e-js', run: runTag, ...(opts.metadata ?? {}) },
      })
      created.add(sbx)
      return sbx
    } catch (e) {
      if (!(e instanceof ServiceBusyError) || Date.now() > deadline) throw e
      await sleep(1000)
    }
  }
}

/** Kills every sandbox `createSandbox` made in this process; for `after` hooks. */
export async function killAll() {
  const all = [...created]
  created.clear()
  await Promise.allSettled(all.map((s) => Sandbox.kill(s.sandboxId)))
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/** Polls `cond` until it returns a truthy value or `ms` pass; returns that value or throws. */
export async function waitFor(cond, what, ms = 15_000) {
  const deadline = Date.now() + ms
  for (;;) {
    const v = await cond()
    if (v) return v
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`)
    await sleep(50)
  }
}
