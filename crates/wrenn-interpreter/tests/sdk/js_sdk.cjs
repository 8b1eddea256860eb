// The official @e2b/code-interpreter SDK (2.x) against a wrenn-interpreter at
// WRENN_INTERPRETER_URL. CommonJS so NODE_PATH can point at any node_modules.
// Prints "js sdk: ok" when everything held.
const assert = require('node:assert/strict')
const { Sandbox, NotFoundError, TimeoutError } = require('@e2b/code-interpreter')

async function main() {
  const sbx = new Sandbox({
    sandboxId: 'sbx',
    sandboxUrl: process.env.WRENN_INTERPRETER_URL,
    envdAccessToken: 'token',
    apiKey: 'unused',
  })
  let ex = await sbx.runCode('x = 1; x += 1; x')
  assert.equal(ex.text, '2')
  assert.equal(ex.executionCount, 1)
  assert.deepEqual(ex.results[0].formats(), [])

  const lines = []
  ex = await sbx.runCode('print("héllo ✓")\n1/0', { onStdout: (m) => lines.push(m.line) })
  assert.deepEqual(ex.logs.stdout, ['héllo ✓\n'])
  assert.deepEqual(lines, ['héllo ✓\n'])
  assert.equal(ex.error.name, 'ZeroDivisionError')
  assert.equal(ex.error.value, 'division by zero')

  ex = await sbx.runCode('import os; os.environ["JS_ENV"]', { envs: { JS_ENV: 'v' } })
  assert.equal(ex.text, 'v')

  const ctx = await sbx.createCodeContext({ cwd: '/tmp' })
  assert.equal(ctx.language, 'python')
  assert.equal(ctx.cwd, '/tmp')
  assert.ok((await sbx.listCodeContexts()).some((c) => c.id === ctx.id))
  await sbx.runCode('v = 1', { context: ctx })
  assert.equal((await sbx.runCode('v', { context: ctx })).text, '1')
  await sbx.restartCodeContext(ctx)
  assert.equal((await sbx.runCode('v', { context: ctx })).error.name, 'NameError')
  await sbx.removeCodeContext(ctx)
  await assert.rejects(sbx.runCode('1', { context: ctx }), NotFoundError)

  await sbx.runCode('kept = True')
  await assert.rejects(sbx.runCode('import time; time.sleep(30)', { timeoutMs: 1000 }), TimeoutError)
  assert.equal((await sbx.runCode('kept')).text, 'True')
  console.log('js sdk: ok')
}

main().then(
  // The SDK leaves a request timer running after some errors; do not wait for it.
  () => process.exit(0),
  (e) => {
    console.error(e)
    process.exit(1)
  },
)
