// The search page: asks /api/search and draws the answer as a grid of /images/{id} thumbnails.
// Every text from the server is set with textContent, never parsed as HTML.
"use strict";

const form = document.getElementById("search");
const queryInput = document.getElementById("query");
const kSelect = document.getElementById("k");
const imageInput = document.getElementById("image");
const queryImage = document.getElementById("query-image");
const statusLine = document.getElementById("status");
const grid = document.getElementById("results");

async function answer(response) {
  const body = await response.json().catch(() => ({ error: `the server answered HTTP ${response.status}` }));
  if (!response.ok) {
    throw new Error(body.error || `the server answered HTTP ${response.status}`);
  }
  return body;
}

function showResults(results, what) {
  grid.replaceChildren();
  for (const result of results) {
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = `/images/${encodeURIComponent(result.image_id)}`;
    image.alt = result.caption || result.image_id;
    image.title = result.path || result.image_id;
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${result.rank}. ${result.score.toFixed(3)}`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = result.caption || result.image_id;
    caption.append(score, text);
    figure.append(image, caption);
    grid.append(figure);
  }
  statusLine.textContent = `${results.length} results for ${what}`;
  statusLine.className = "";
}

function showError(error) {
  grid.replaceChildren();
  statusLine.textContent = error.message;
  statusLine.className = "error";
}

async function searchText(event) {
  event.preventDefault();
  const query = queryInput.value.trim();
  if (!query) {
    showError(new Error("type what to look for, e.g. a woman in a red coat"));
    return;
  }
  queryImage.hidden = true;
  statusLine.textContent = "searching…";
  try {
    const response = await fetch(`/api/search?q=${encodeURIComponent(query)}&k=${kSelect.value}`);
    showResults(await answer(response), `“${query}”`);
  } catch (error) {
    showError(error);
  }
}

async function searchImage() {
  const file = imageInput.files[0];
  if (!file) {
    return;
  }
  URL.revokeObjectURL(queryImage.src);
  queryImage.src = URL.createObjectURL(file);
  queryImage.hidden = false;
  statusLine.textContent = "searching…";
  const body = new FormData();
  body.append("image", file);
  try {
    const response = await fetch(`/api/search?k=${kSelect.value}`, { method: "POST", body });
    showResults(await answer(response), `image ${file.name}`);
  } catch (error) {
    showError(error);
  } finally {
    imageInput.value = "";
  }
}

async function describeService() {
  try {
    const health = await answer(await fetch("/api/health"));
    document.getElementById("model").textContent = health.model;
    document.getElementById("gallery").textContent = `${health.gallery}: ${health.images} images, ${health.index} search`;
    const fitting = [...kSelect.options].filter((option) => Number(option.value) <= health.images);
    if (!fitting.length) {
      fitting.push(new Option(String(health.images)));
      kSelect.add(fitting[0]);
    }
    for (const option of kSelect.options) {
      option.disabled = !fitting.includes(option);
    }
    if (kSelect.selectedOptions[0].disabled) {
      kSelect.value = fitting[fitting.length - 1].value;
    }
  } catch (error) {
    showError(error);
  }
}

form.addEventListener("submit", searchText);
imageInput.addEventListener("change", searchImage);
describeService();
