--* subject: funcs.wasmhello
--* name: wasmhello
--* executor: wasm
hello.wasm
