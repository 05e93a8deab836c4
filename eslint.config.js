// Lint: typescript-eslint's recommended rules, plus the layer rule from STYLE.md: only
// ts/src/native/binding.ts loads the addon.
import js from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
  { ignores: ["dist/**", "build/**", "node_modules/**", "**/*.gen.ts"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { process: "readonly", console: "readonly", Buffer: "readonly", setTimeout: "readonly", clearTimeout: "readonly", setImmediate: "readonly", URL: "readonly", performance: "readonly", setInterval: "readonly", clearInterval: "readonly", clearImmediate: "readonly", TextEncoder: "readonly", TextDecoder: "readonly", AbortController: "readonly", queueMicrotask: "readonly", structuredClone: "readonly" } },
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
      "@typescript-eslint/no-explicit-any": "off",
      // walking a chain from `this` (cur = this; cur = cur.next) is the clearest form for views and paths
      "@typescript-eslint/no-this-alias": "off",
      "no-restricted-syntax": [
        "error",
        {
          selector: "CallExpression[callee.name='require'][arguments.0.value=/\\.node$/]",
          message: "Only ts/src/native/binding.ts loads the addon.",
        },
      ],
    },
  },
  {
    files: ["ts/src/**/*.ts"],
    ignores: ["ts/src/native/binding.ts"],
    rules: {
      "no-restricted-imports": ["error", { patterns: [{ group: ["**/build/**"], message: "load the addon through ts/src/native/binding.ts" }] }],
    },
  },
);
