// The official @e2b/code-interpreter JS SDK (2.x, unmodified, from tests/sdk/node_modules)
// against `wrenn up`: `Sandbox.create()` with no template asks for `code-interpreter-v1`.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox } from '../../sdk/node_modules/@e2b/code-interpreter/dist/index.mjs'
import { runTag } from './helpers.mjs'

let sbx

before(async () => {
  sbx = await Sandbox.create({
    timeoutMs: 600_000,
    metadata: { suite: 'e2e-js', run: runTag },
  })
})

after(async () => {
  if (sbx) await Sandbox.kill(sbx.sandboxId)
})

test('the default template runs code', async () => {
  const info = await sbx.getInfo()
  assert.equal(info.templateId, 'code-interpreter-v1')
  const ex = await sbx.runCode('1+1')
  assert.equal(ex.error, undefined)
  assert.equal(ex.text, '2')
})

test('an exception is an error with its name', async () => {
  const ex = await sbx.runCode('1/0')
  assert.ok(ex.error, 'no error')
  assert.equal(ex.error.name, 'ZeroDivisionError')
  assert.match(ex.error.value, /division by zero/)
})
